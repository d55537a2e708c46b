"""PNG plots of the analysis (matplotlib, Agg backend; sized to the content).

Each function draws one figure, writes it atomically and returns the path.
"""

from __future__ import annotations

import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402

from sslbench_jax import atomic  # noqa: E402

from sslbench_jax.analysis import names  # noqa: E402
from sslbench_jax.analysis import stats  # noqa: E402

_BACKBONE_COLOURS = {"ResNet": "tab:blue", "ViT": "tab:orange", names.UNKNOWN: "tab:gray"}
_FAMILY_MARKERS = {"discriminative": "o", "generative": "s", names.UNKNOWN: "^"}


def safe_name(text: str) -> str:
  """A file-name-safe version of a protocol name ("linear+bn" -> "linear_bn")."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _save(fig, path: str) -> str:
  try:
    with atomic.atomic_open(path, suffix=".png") as f:
      fig.savefig(f, dpi=110, bbox_inches="tight", format="png")
  finally:
    plt.close(fig)
  return path


def _metric_label(table) -> str:
  """Axis wording of the analysed metric; ``primary`` is top-1 on ImageNet val
  and the transfer datasets (only ReaL/R/A differ, and they are not plotted
  against)."""
  metric = getattr(table, "metric", "top1")
  return {"top1": "top-1", "primary": "top-1", "top5": "top-5"}.get(metric, metric)


def _pretty_column(col: str) -> str:
  protocol, _, dataset = col.rpartition("/")
  shown = "mean OOD" if dataset == "mean_ood" else names.dataset_display(dataset)
  return f"{protocol}: {shown}"


def correlation_heatmap(columns: list[str], matrix: np.ndarray, path: str,
                        method: str = "spearman") -> str:
  """Heatmap of a correlation matrix between ``protocol/dataset`` columns."""
  c = len(columns)
  size = max(5.0, 0.26 * c + 2.5)
  fig, ax = plt.subplots(figsize=(size + 1.2, size))
  im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
  labels = [_pretty_column(col) for col in columns]
  fs = 9 if c <= 20 else 7
  ax.set_xticks(range(c), labels, rotation=90, fontsize=fs)
  ax.set_yticks(range(c), labels, fontsize=fs)
  # Lines between protocol blocks make the structure readable.
  protos = [col.rpartition("/")[0] for col in columns]
  for i in range(1, c):
    if protos[i] != protos[i - 1]:
      ax.axhline(i - 0.5, color="black", lw=0.8)
      ax.axvline(i - 0.5, color="black", lw=0.8)
  if c <= 16:
    for i in range(c):
      for j in range(c):
        if np.isfinite(matrix[i, j]):
          ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                  color="white" if abs(matrix[i, j]) > 0.6 else "black")
  fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label=f"{method} correlation")
  ax.set_title(f"{method.capitalize()} correlation across models")
  return _save(fig, path)


def _place_labels(ax, xs, ys, texts, fontsize: float = 6.5) -> None:
  """Annotates points, choosing for each label the first of 8 offsets whose
  box overlaps no label placed so far and no other marker (greedy)."""
  if not len(xs):
    return
  ax.autoscale_view()
  scale = ax.figure.dpi / 72.0  # points -> pixels
  pts = ax.transData.transform(np.column_stack([xs, ys]))
  h = fontsize * scale
  offsets = [(3, 2), (3, -8), (-3, 2), (-3, -8), (5, -3), (-5, -3), (0, 5), (0, -11)]
  boxes = []

  def overlap(b):
    hits = sum(not (b[2] < o[0] or o[2] < b[0] or b[3] < o[1] or o[3] < b[1])
               for o in boxes)
    r = 3 * scale
    hits += sum(b[0] - r < px < b[2] + r and b[1] - r < py < b[3] + r for px, py in pts)
    return hits

  for (px, py), text in zip(pts, texts):
    w = 0.62 * fontsize * len(text) * scale
    best = None
    for dx, dy in offsets:
      x0 = px + dx * scale - (w if dx < 0 else 0) - (w / 2 if dx == 0 else 0)
      y0 = py + dy * scale
      box = (x0, y0, x0 + w, y0 + h)
      score = overlap(box)
      if best is None or score < best[0]:
        best = (score, box, dx, dy)
      if score == 0:
        break
    _, box, dx, dy = best
    boxes.append(box)
    ha = "left" if dx > 0 else ("right" if dx < 0 else "center")
    ax.annotate(text, ax.transData.inverted().transform((px, py)), xytext=(dx, dy),
                textcoords="offset points", fontsize=fontsize, color="0.2", ha=ha,
                va="bottom")


def indomain_vs_ood_scatter(table, protocols: list[str], path: str,
                            x_dataset: str = names.IN_DOMAIN) -> str:
  """In-domain vs mean out-of-domain accuracy, one panel per protocol.

  Points are numbered; the key on the right maps numbers to model names
  (26 names as point labels would overlap). Line: least squares; band:
  pointwise 95% confidence band of the mean.
  """
  from sslbench_jax.analysis import correlations  # local: avoid import cycle

  models = table.models
  k = len(protocols)
  ncols = min(k, 2)
  nrows = int(np.ceil(k / ncols))
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols + 2.6, 4.4 * nrows),
                           squeeze=False)
  for ax, p in zip(axes.flat, protocols):
    x = correlations.column(table, f"{p}/{x_dataset}")
    y = correlations.column(table, f"{p}/{correlations.MEAN_OOD}")
    ok = np.isfinite(x) & np.isfinite(y)
    for i in np.flatnonzero(ok):
      m = models[i]
      ax.scatter(x[i], y[i], s=30,
                 c=_BACKBONE_COLOURS.get(table.backbone.get(m), "tab:gray"),
                 marker=_FAMILY_MARKERS.get(table.method_family.get(m), "^"),
                 edgecolors="black", linewidths=0.4, zorder=3)
    if ok.sum() >= 3 and np.ptp(x[ok]) > 0:
      grid = np.linspace(x[ok].min(), x[ok].max(), 100)
      fit, lo, hi = stats.linear_fit_band(x[ok], y[ok], grid)
      ax.plot(grid, fit, color="black", lw=1.2, label="least-squares fit")
      ax.fill_between(grid, lo, hi, color="0.6", alpha=0.3, label="95% CI of fit")
      r = stats.pearson(x[ok], y[ok])
      rho = stats.spearman(x[ok], y[ok])
      ax.set_title(f"{p}: Pearson r={r:.2f}, Spearman ρ={rho:.2f} (n={ok.sum()})",
                   fontsize=10)
    else:
      ax.set_title(f"{p}: not enough data", fontsize=10)
    idx = np.flatnonzero(ok)
    _place_labels(ax, x[idx], y[idx], [str(i + 1) for i in idx])
    ax.set_xlabel(f"{names.dataset_display(x_dataset)} {_metric_label(table)} (%)")
    ax.set_ylabel(f"mean out-of-domain {_metric_label(table)} (%)")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[k:]:
    ax.axis("off")
  handles = [plt.Line2D([], [], marker="o", ls="", color=col, label=f"{b} backbone")
             for b, col in _BACKBONE_COLOURS.items()
             if b in set(table.backbone.values())]
  handles += [plt.Line2D([], [], marker=mk, ls="", color="0.4", label=fam)
              for fam, mk in _FAMILY_MARKERS.items()
              if fam in set(table.method_family.values())]
  handles += [plt.Line2D([], [], color="black", label="least-squares fit"),
              plt.Rectangle((0, 0), 1, 1, color="0.6", alpha=0.3, label="95% CI of fit")]
  fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize=8,
             title="legend")
  key = "\n".join(f"{i + 1:>2}  {m}" for i, m in enumerate(models))
  fig.text(1.01, 0.70, key, va="top", ha="left", fontsize=7, family="monospace")
  fig.tight_layout()
  return _save(fig, path)


def bump_chart(rank_rows: list[dict], protocol: str, path: str) -> str:
  """Rank of every model on ImageNet val and each variant (1 = best, top).

  Names sit at the left (ImageNet order) and right (last variant order), one
  per row slot, so they never overlap even with tied ranks.
  """
  rows = [r for r in rank_rows if r["protocol"] == protocol]
  variants = [v for v in names.VARIANTS if any(r["variant"] == v for r in rows)]
  models = sorted({r["model"] for r in rows})
  cols = [names.IN_DOMAIN] + variants
  ranks = np.full((len(models), len(cols)), np.nan)
  for r in rows:
    i = models.index(r["model"])
    ranks[i, 0] = r["rank_imagenet"] if np.isnan(ranks[i, 0]) else ranks[i, 0]
    ranks[i, cols.index(r["variant"])] = r["rank_variant"]
  n = len(models)
  fig, ax = plt.subplots(figsize=(2.0 * len(cols) + 5.5, 0.32 * n + 1.8))
  # 10 strong colours x 3 line styles tell 30 models apart.
  cmap = plt.get_cmap("tab10")
  colour = lambda i: cmap(i % 10)  # noqa: E731
  for i, m in enumerate(models):
    ax.plot(range(len(cols)), ranks[i], marker="o", ms=4, lw=1.3,
            color=colour(i), ls=("-", "--", ":")[(i // 10) % 3])
  for side, j, ha, dx in (("left", 0, "right", -0.12), ("right", len(cols) - 1, "left", 0.12)):
    order = np.argsort(np.nan_to_num(ranks[:, j], nan=1e9), kind="stable")
    for slot, i in enumerate(order):
      y = slot + 1
      ax.text(j + dx, y, f"{models[i]} ({ranks[i, j]:g})", ha=ha, va="center",
              fontsize=7.5, color=colour(i))
  ax.set_ylim(n + 0.7, 0.3)
  ax.set_xlim(-1.6, len(cols) - 1 + 1.6)
  ax.set_xticks(range(len(cols)), [names.dataset_display(c) for c in cols])
  ax.set_ylabel("rank among models (1 = best)")
  ax.set_yticks(range(1, n + 1))
  ax.tick_params(axis="y", labelsize=7)
  ax.grid(axis="x", alpha=0.3)
  ax.set_title(f"{protocol}: rank changes from ImageNet val to its variants "
               "(ranks recomputed among models with both numbers)", fontsize=10)
  return _save(fig, path)


def protocol_bars(table, protocol: str, comparison: list[dict], path: str) -> str:
  """ImageNet top-1 per model under one protocol, with published numbers.

  Horizontal bars (names stay readable); published baselines as diamonds
  (hollow: unverified number).
  """
  models = [m for m in table.models if (m, protocol, names.IN_DOMAIN) in table.values]
  vals = np.array([table.values[(m, protocol, names.IN_DOMAIN)] for m in models])
  order = np.argsort(vals)
  n = len(models)
  fig, ax = plt.subplots(figsize=(8.5, 0.3 * n + 1.6))
  colours = [_BACKBONE_COLOURS.get(table.backbone.get(models[i]), "tab:gray") for i in order]
  ax.barh(range(n), vals[order], color=colours, alpha=0.85)
  ax.set_yticks(range(n), [models[i] for i in order], fontsize=8)
  for pos, i in enumerate(order):
    # At the bar's base, away from the published markers near its end.
    ax.text(0.8, pos, f"{vals[i]:.1f}", va="center", ha="left",
            fontsize=6.5, color="white")
  shown = set()
  for c in comparison:
    if c["protocol"] != protocol or c["model"] not in models:
      continue
    pos = list(order).index(models.index(c["model"]))
    label = "published (verified)" if c["verified"] else "published (NOT verified)"
    ax.scatter(c["published"], pos, marker="D", s=36, zorder=4,
               facecolors="black" if c["verified"] else "white", edgecolors="black",
               label=None if label in shown else label)
    shown.add(label)
  handles = [plt.Rectangle((0, 0), 1, 1, color=col, alpha=0.85, label=f"ours ({b})")
             for b, col in _BACKBONE_COLOURS.items() if b in {table.backbone.get(m) for m in models}]
  ax.legend(handles=handles + ax.get_legend_handles_labels()[0], loc="upper left",
            bbox_to_anchor=(1.01, 1.0), fontsize=8)
  ax.set_xlabel(f"{names.dataset_display(names.IN_DOMAIN)} {_metric_label(table)} (%)")
  ax.set_xlim(0, max(100.0, float(np.nanmax(vals)) + 5) if n else 100)
  ax.set_ylim(-0.7, n - 0.3)
  ax.grid(axis="x", alpha=0.3)
  ax.set_title(f"{protocol}: ImageNet {_metric_label(table)} per model")
  return _save(fig, path)
