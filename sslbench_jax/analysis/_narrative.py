"""Generated report prose: what each section's numbers show, read off its table.

Every sentence is computed from the analysis rows (the same rows the CSV
files hold, formatted like the report's tables: accuracies 2 decimals,
correlations 3, p-values 4), never written by hand. The ``enough_*``
functions decide whether a section has enough models / datasets / protocols
to say anything; when not, ``too_few`` gives the one line the report shows
instead of a table or an empty plot.
"""

from __future__ import annotations

import math

import numpy as np

from sslbench_jax.analysis import names

# Correlations (and their intervals) need 3 models; a ranking needs 2.
MIN_CORRELATION_MODELS = 3
MIN_RANKING_MODELS = 2


def fmt(v, digits: int = 2) -> str:
  """Formats a number for the report ("–" for NaN)."""
  if isinstance(v, (bool, np.bool_)):
    return "yes" if v else "no"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  v = float(v)
  return "–" if math.isnan(v) else f"{v:.{digits}f}"


def ci(r: dict) -> str:
  """``[low, high]`` of a row with ``ci_low`` / ``ci_high`` (3 decimals)."""
  return f"[{fmt(r['ci_low'], 3)}, {fmt(r['ci_high'], 3)}]"


def too_few(what: str, needs: str, holds: str) -> str:
  """The one-line statement of a section that cannot be computed."""
  return f"Not shown: {what} needs {needs}; the results hold {holds}."


def _plural(n: int, word: str) -> str:
  return f"{n} {word}" + ("" if n == 1 else "s")


def _col(name: str) -> tuple[str, str]:
  protocol, _, dataset = name.rpartition("/")
  return protocol, dataset


def shown(dataset: str) -> str:
  """Display name of a dataset key or of a pseudo-column (mean_ood, ...)."""
  return {"mean_ood": "mean out-of-domain",
          "variants_weighted_mean": "weighted mean over val + variants",
          "variants_geometric_mean": "geometric mean over val + variants",
          }.get(dataset, names.dataset_display(dataset))


def _finite(rows: list[dict], key: str = "r") -> list[dict]:
  return [r for r in rows if np.isfinite(r[key])]


def _spearman_phrase(r: dict) -> str:
  return (f"Spearman {fmt(r['r'], 3)} {ci(r)}, permutation p = {fmt(r['p_value'], 4)}, "
          f"{_plural(int(r['n_models']), 'model')}")


# ------------------------------------------------------------- aggregates


def aggregates_text(rows: list[dict], n_datasets: int) -> str:
  """Who leads / trails one protocol's aggregate table (rows of one suite)."""
  if len({r["model"] for r in rows}) < MIN_RANKING_MODELS:
    return too_few("a ranking", f"{MIN_RANKING_MODELS} models",
                   _plural(len({r["model"] for r in rows}), "model")) + \
        " Its means are listed."
  best = min(rows, key=lambda r: (r["mean_rank"], r["model"]))
  worst = max(rows, key=lambda r: (r["mean_rank"], r["model"]))
  by_mean = max(rows, key=lambda r: (r["mean"], r["model"]))
  text = (f"Over {_plural(n_datasets, 'dataset')}, {best['model']} has the best mean "
          f"rank ({fmt(best['mean_rank'])}, mean {fmt(best['mean'])}) and "
          f"{worst['model']} the worst ({fmt(worst['mean_rank'])}, mean "
          f"{fmt(worst['mean'])}) of {_plural(len(rows), 'model')}.")
  if by_mean["model"] != best["model"]:
    text += (f" The highest mean is {by_mean['model']}'s ({fmt(by_mean['mean'])}): "
             "mean and mean rank disagree.")
  return text


# ------------------------------------------------------ benchmark lottery


def lottery_text(corr_rows: list[dict], table_rows: list[dict]) -> str:
  """Val ranking vs each variant's ranking and vs the aggregates' rankings.

  Args:
    corr_rows: its ``p/imagenet`` vs ``p/<variant or aggregate>`` Spearman rows.
    table_rows: the lottery table rows (dicts with ``model``, ``val_rank``,
      ``wmean_rank``, ``gmean_rank``).
  """
  parts = []
  variants = _finite([r for r in corr_rows if _col(r["y"])[1] in names.VARIANTS])
  if variants:
    lo = min(variants, key=lambda r: r["r"])
    hi = max(variants, key=lambda r: r["r"])
    if lo is hi or lo["r"] == hi["r"]:
      parts.append(f"The ImageNet val ranking agrees with every variant's at "
                   f"{_spearman_phrase(lo)}.")
    else:
      parts.append(
          f"The ImageNet val ranking agrees least with {shown(_col(lo['y'])[1])}'s "
          f"({_spearman_phrase(lo)}) and most with {shown(_col(hi['y'])[1])}'s "
          f"({_spearman_phrase(hi)}).")
  for agg in ("variants_weighted_mean", "variants_geometric_mean"):
    r = next((r for r in _finite(corr_rows) if _col(r["y"])[1] == agg), None)
    if r is not None:
      parts.append(f"Val vs the {shown(agg)} ranking: {_spearman_phrase(r)}.")
  if len(table_rows) >= MIN_RANKING_MODELS:
    top = {}
    for k in ("val_rank", "wmean_rank", "gmean_rank"):
      ranks = [m[k] for m in table_rows if np.isfinite(m[k])]
      top[k] = sorted(m["model"] for m in table_rows if ranks and m[k] == min(ranks))
    if top["val_rank"]:
      same = top["val_rank"] == top["wmean_rank"] == top["gmean_rank"]
      parts.append(
          f"Best on val: {', '.join(top['val_rank'])}"
          + (" -- also best by weighted and geometric mean." if same else
             f"; by weighted mean: {', '.join(top['wmean_rank']) or '–'}; by geometric "
             f"mean: {', '.join(top['gmean_rank']) or '–'}."))
  return " ".join(parts)


def rank_change_text(rows: list[dict]) -> str:
  """How many models move, and the largest move, per variant."""
  parts = []
  for v in names.VARIANTS:
    vr = [r for r in rows if r["variant"] == v]
    if not vr:
      continue
    moved = [r for r in vr if r["rank_change"] != 0]
    if not moved:
      parts.append(f"{names.dataset_display(v)}: no model changes rank.")
      continue
    big = max(moved, key=lambda r: (abs(r["rank_change"]), r["model"]))
    parts.append(f"{names.dataset_display(v)}: {len(moved)} of {len(vr)} models change "
                 f"rank, most {big['model']} ({fmt(big['rank_imagenet'])} -> "
                 f"{fmt(big['rank_variant'])}).")
  return " ".join(parts)


# ---------------------------------------------------- correlations


def ood_text(rows: list[dict]) -> str:
  """In-domain vs mean OOD, per protocol (same-protocol Pearson/Spearman rows)."""
  by_protocol: dict[str, list[str]] = {}
  n: dict[str, int] = {}
  for r in rows:
    px, py = _col(r["x"])[0], _col(r["y"])[0]
    if px != py or r["method"] not in ("pearson", "spearman") or not np.isfinite(r["r"]):
      continue
    by_protocol.setdefault(px, []).append(
        f"{r['method'].capitalize()} {fmt(r['r'], 3)} {ci(r)} (p = {fmt(r['p_value'], 4)})")
    n[px] = int(r["n_models"])
  if not by_protocol:
    return "Every in-domain vs out-of-domain correlation is undefined (constant columns)."
  return ("ImageNet accuracy vs mean out-of-domain accuracy across models -- " +
          "; ".join(f"{p}: {', '.join(v)}, {_plural(n[p], 'model')}"
                    for p, v in by_protocol.items()) + ".")


def predictors_text(rows: list[dict]) -> str:
  """The best in-domain predictor per target."""
  parts = []
  for r in rows:
    if r["best"]:
      parts.append(f"{r['target']} is best predicted by {r['predictor']} (LOO RMSE "
                   f"{fmt(r['loo_rmse'])} points, {_plural(int(r['n_models']), 'model')})")
  return ("; ".join(parts) + ".") if parts else "No predictor could be fitted."


def agreement_text(rows: list[dict], max_datasets: int = 4) -> str:
  """Protocol agreement per dataset from the Spearman rows.

  Args:
    rows: protocol-vs-protocol rows (same dataset on both sides).
    max_datasets: datasets described (the rest: correlations.csv).
  """
  sp = [r for r in rows if r["method"] == "spearman"]
  by_dataset: dict[str, list[dict]] = {}
  for r in sp:
    by_dataset.setdefault(_col(r["x"])[1], []).append(r)
  parts = []
  for d, rs in list(by_dataset.items())[:max_datasets]:
    fin = _finite(rs)
    if not fin:
      parts.append(f"On {shown(d)} no protocol pair has a defined correlation "
                   "(a protocol gives every model the same accuracy).")
      continue
    ident = [r for r in fin if r["r"] == 1.0]
    if len(ident) == len(rs) and len(rs) > 1:
      r = ident[0]
      parts.append(f"On {shown(d)} all {len(rs)} protocol pairs rank the "
                   f"{_plural(int(r['n_models']), 'model')} identically (Spearman 1.000).")
      continue
    lo = min(fin, key=lambda r: r["r"])
    hi = max(fin, key=lambda r: r["r"])
    verb = "rank the {} identically".format(_plural(int(hi["n_models"]), "model")) \
        if hi["r"] == 1.0 else "agree most"
    text = (f"On {shown(d)}, {_col(hi['x'])[0]} and {_col(hi['y'])[0]} {verb}, "
            f"{_spearman_phrase(hi)}")
    if lo is not hi:
      text += (f"; {_col(lo['x'])[0]} and {_col(lo['y'])[0]} agree least, "
               f"{_spearman_phrase(lo)}")
    parts.append(text + ".")
  if len(by_dataset) > max_datasets:
    parts.append(f"({len(by_dataset) - max_datasets} more datasets in correlations.csv.)")
  return " ".join(parts)


def grouped_text(rows: list[dict]) -> str:
  """Within-group in-domain vs OOD Spearman, per group."""
  parts = []
  for r in rows:
    if r["method"] == "spearman" and np.isfinite(r["r"]):
      parts.append(f"{r['group']} ({_col(r['x'])[0]}): Spearman {fmt(r['r'], 3)} {ci(r)}, "
                   f"{_plural(int(r['n_models']), 'model')}")
  return ("Within groups -- " + "; ".join(parts) + ".") if parts else \
      "No group has enough models for a correlation."


def bn_text(rows: list[dict]) -> str:
  """The BN effect over all models, per protocol and dataset."""
  parts = []
  for r in rows:
    if r["group"] != "all":
      continue
    sign = "+" if r["mean_diff"] >= 0 else ""
    parts.append(f"{r['protocol']} on {shown(r['dataset'])}: {sign}{fmt(r['mean_diff'])} "
                 f"points {ci(r)}, better with BN for {r['n_improved']} of "
                 f"{_plural(int(r['n_models']), 'model')}")
  return ("BatchNorm before the head changes accuracy by -- " + "; ".join(parts) + ".") \
      if parts else ""


def comparison_text(rows: list[dict]) -> str:
  """Mean and largest gap between our ImageNet numbers and published ones."""
  have = [r for r in rows if np.isfinite(r["delta"])]
  if not have:
    return (f"{_plural(len(rows), 'published number')} matched, none with a number of "
            "ours under the same protocol.")
  big = max(have, key=lambda r: (abs(r["delta"]), r["model"]))
  mean = float(np.mean([r["delta"] for r in have]))
  return (f"{_plural(len(have), 'comparison')}: ours - published is {fmt(mean)} points "
          f"on average; largest gap {big['model']} ({big['protocol']}): "
          f"{fmt(big['ours'])} vs {fmt(big['published'])} ({fmt(big['delta'])}).")
