"""Markdown / HTML report: the analysis tables plus PNG plots.

Both formats are rendered from one list of ``Section``s, so they show the
same numbers (accuracies to 2 decimals, correlations to 3, p-values to 4).
"""

from __future__ import annotations

import dataclasses
import html
import math
import os

import numpy as np

from sslbench_jax import atomic

from sslbench_jax.analysis import aggregates
from sslbench_jax.analysis import correlations
from sslbench_jax.analysis import names
from sslbench_jax.analysis import plots
from sslbench_jax.analysis import table as table_lib
from sslbench_jax.analysis.summary import Analysis


@dataclasses.dataclass
class Section:
  """A titled block: paragraphs, optional table, optional images."""
  title: str
  text: list[str] = dataclasses.field(default_factory=list)
  header: list[str] | None = None
  rows: list[list[str]] = dataclasses.field(default_factory=list)
  images: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, alt)
  level: int = 2


def fmt(v, digits: int = 2) -> str:
  """Formats a number for the report ("–" for NaN)."""
  if isinstance(v, (bool, np.bool_)):
    return "yes" if v else "no"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  v = float(v)
  return "–" if math.isnan(v) else f"{v:.{digits}f}"


def _ci(r) -> str:
  return f"[{fmt(r['ci_low'], 3)}, {fmt(r['ci_high'], 3)}]"


def _corr_rows(rows):
  return [[r["x"], r["y"], r["method"], fmt(r["r"], 3), _ci(r), fmt(r["p_value"], 4),
           fmt(r["n_models"])] for r in rows]


_CORR_HEADER = ["x", "y", "method", "r", "95% CI", "p (perm.)", "n models"]


def make_plots(a: Analysis, out_dir: str) -> dict[str, str]:
  """Draws every plot into ``out_dir/plots``; returns {name: path}."""
  pdir = os.path.join(out_dir, "plots")
  t = a.table
  out = {}
  if a.matrix_columns:
    out["heatmap"] = plots.correlation_heatmap(
        a.matrix_columns, a.matrix, os.path.join(pdir, "correlation_heatmap.png"),
        a.matrix_method)
  if names.IN_DOMAIN in t.benchmark_datasets and t.ood_datasets:
    out["scatter"] = plots.indomain_vs_ood_scatter(
        t, t.protocols, os.path.join(pdir, "indomain_vs_ood.png"))
  for p in t.protocols:
    if any(r["protocol"] == p for r in a.rank_changes):
      out[f"bump/{p}"] = plots.bump_chart(
          a.rank_changes, p, os.path.join(pdir, f"rank_changes_{plots.safe_name(p)}.png"))
    if any((m, p, names.IN_DOMAIN) in t.values for m in t.models):
      out[f"bars/{p}"] = plots.protocol_bars(
          t, p, a.comparison, os.path.join(pdir, f"imagenet_{plots.safe_name(p)}.png"))
  return out


def build_sections(a: Analysis, plot_paths: dict[str, str], out_dir: str,
                   source: str = "") -> list[Section]:
  """The report's content as sections (tables formatted as strings)."""
  t = a.table
  rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
  secs = [Section("sslbench_jax analysis report", level=1, text=[
      f"Source: `{source}`; metric: `{t.metric}` (percent)." +
      (" Primary = each test set's main metric: real_top1 on ImageNet ReaL, "
       "subset_top1 on ImageNet-R / -A, top1 elsewhere." if t.metric == table_lib.PRIMARY
       else ""),
      f"{len(t.models)} models, protocols: {', '.join(t.protocols)}; "
      f"benchmark datasets ({len(t.benchmark_datasets)}): "
      f"{', '.join(t.benchmark_datasets)}; ImageNet variants: "
      f"{', '.join(d for d in t.datasets if d in names.VARIANTS) or 'none'}.",
      f"Intervals: percentile bootstrap over models ({a.n_boot} resamples, seed "
      f"{a.seed}); p-values: two-sided permutation tests ({a.n_perm} "
      "permutations, (count+1)/(n+1)). Mean OOD = mean over the out-of-domain "
      "datasets (models missing one are left out of comparisons using it)."])]

  # Aggregates.
  for p in t.protocols:
    rows = sorted((r for r in a.aggregates
                   if r["protocol"] == p and r["suite"] == aggregates.BENCHMARK),
                  key=lambda r: (r["mean_rank"], r["model"]))
    secs.append(Section(
        f"Aggregates: {p}", level=3,
        text=["Over the benchmark datasets present; weighted mean uses n_examples; "
              "ranks per dataset (1 = best, ties averaged)."],
        header=["model", "backbone", "method family", "datasets", "mean",
                "weighted mean", "geometric mean", "mean rank"],
        rows=[[r["model"], r["backbone"], r["method_family"], fmt(r["n_datasets"]),
               fmt(r["mean"]), fmt(r["weighted_mean"]), fmt(r["geometric_mean"]),
               fmt(r["mean_rank"])] for r in rows]))

  # In-domain vs out-of-domain.
  ind = f"/{names.IN_DOMAIN}"
  ood_rows = [r for r in a.correlations
              if r["x"].endswith(ind) and r["y"].endswith("/" + correlations.MEAN_OOD)]
  if ood_rows:
    secs.append(Section(
        "In-domain (ImageNet) vs mean out-of-domain accuracy",
        text=["Across models; `pearson_partial_backbone` residualises both sides "
              "on a ViT/ResNet indicator."],
        header=_CORR_HEADER, rows=_corr_rows(ood_rows),
        images=[(rel(plot_paths["scatter"]), "in-domain vs out-of-domain")]
        if "scatter" in plot_paths else []))
  if a.predictors:
    secs.append(Section(
        "Which in-domain protocol best predicts mean out-of-domain accuracy",
        text=["Leave-one-model-out error of a linear fit target ~ a + b * predictor "
              "(accuracy points)."],
        header=["target", "predictor", "LOO RMSE", "LOO MAE", "n models", "best"],
        rows=[[r["target"], r["predictor"], fmt(r["loo_rmse"]), fmt(r["loo_mae"]),
               fmt(r["n_models"]), fmt(r["best"])] for r in a.predictors]))

  # Protocol agreement (ImageNet and mean OOD here; all datasets in the CSV).
  agree = [r for r in a.correlations
           if r["method"] != "pearson_partial_backbone"
           and r["x"].rpartition("/")[2] == r["y"].rpartition("/")[2]
           and r["x"].rpartition("/")[2] in (names.IN_DOMAIN, correlations.MEAN_OOD)]
  if agree or "heatmap" in plot_paths:
    secs.append(Section(
        "Agreement between protocols",
        text=["On ImageNet and on mean OOD (every dataset: correlations.csv). "
              f"Heatmap: {a.matrix_method} correlation between all protocol/dataset "
              "columns (correlation_matrix_<method>.csv)."],
        header=_CORR_HEADER if agree else None, rows=_corr_rows(agree),
        images=[(rel(plot_paths["heatmap"]), "correlation heatmap")]
        if "heatmap" in plot_paths else []))
  if a.grouped:
    secs.append(Section(
        "By backbone and method family",
        text=["In-domain vs mean OOD within each group."],
        header=["group by", "group"] + _CORR_HEADER,
        rows=[[r["group_by"], r["group"]] + _corr_rows([r])[0] for r in a.grouped]))
  if a.bn_effect:
    secs.append(Section(
        "Effect of BatchNorm before the head",
        text=["Paired difference (with BN minus without) across models, accuracy "
              "points; sign-flip permutation p-value."],
        header=["protocol", "dataset", "group", "mean diff", "95% CI", "p (perm.)",
                "n models", "improved"],
        rows=[[r["protocol"], r["dataset"], r["group"], fmt(r["mean_diff"]),
               _ci(r), fmt(r["p_value"], 4),
               fmt(r["n_models"]), fmt(r["n_improved"])] for r in a.bn_effect]))

  # Rank changes.
  for p in t.protocols:
    rows = [r for r in a.rank_changes if r["protocol"] == p]
    if not rows:
      continue
    variants = [v for v in names.VARIANTS if any(r["variant"] == v for r in rows)]
    by_model: dict[str, dict] = {}
    for r in rows:
      by_model.setdefault(r["model"], {"rank": r["rank_imagenet"]})[r["variant"]] = r["rank_change"]
    order = sorted(by_model, key=lambda m: (by_model[m]["rank"], m))
    key = f"bump/{p}"
    secs.append(Section(
        f"Rank changes from ImageNet val: {p}", level=3,
        text=["Rank change = rank on the variant - rank on ImageNet val "
              "(positive: falls behind)."],
        header=["model", "ImageNet rank"] + [f"Δ {names.dataset_display(v)}" for v in variants],
        rows=[[m, fmt(by_model[m]["rank"])] +
              [fmt(by_model[m].get(v, float("nan"))) for v in variants] for m in order],
        images=[(rel(plot_paths[key]), f"rank changes {p}")] if key in plot_paths else []))

  # Published baselines.
  if a.comparison:
    secs.append(Section(
        "Comparison with published PyTorch numbers",
        text=["ImageNet top-1; delta = ours - published. Rows marked unverified come "
              "from memory in the source table."],
        header=["model", "protocol", "ours", "published", "delta", "published as",
                "verified", "note"],
        rows=[[r["model"], r["protocol"], fmt(r["ours"]), fmt(r["published"]),
               fmt(r["delta"]), r["published_method"], fmt(r["verified"]), r["note"]]
              for r in a.comparison]))
  bars = [(rel(v), k) for k, v in plot_paths.items() if k.startswith("bars/")]
  if bars:
    secs.append(Section("ImageNet accuracy per protocol",
                        text=["Diamonds: published numbers (hollow: not verified)."],
                        images=bars))
  return secs


def _md_escape(s: str) -> str:
  return s.replace("|", "\\|")


def to_markdown(sections: list[Section]) -> str:
  """Renders sections as GitHub-flavoured Markdown."""
  out = []
  for s in sections:
    out.append("#" * s.level + " " + s.title)
    out.append("")
    for p in s.text:
      out += [p, ""]
    if s.header:
      out.append("| " + " | ".join(_md_escape(h) for h in s.header) + " |")
      out.append("|" + "---|" * len(s.header))
      for row in s.rows:
        out.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
      out.append("")
    for path, alt in s.images:
      out += [f"![{alt}]({path})", ""]
  return "\n".join(out)


def to_html(sections: list[Section], title: str = "sslbench_jax report") -> str:
  """Renders sections as a standalone HTML page."""
  e = html.escape
  out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
         f"<title>{e(title)}</title>",
         "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
         "table{border-collapse:collapse;font-size:13px;margin:0.5em 0}"
         "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}"
         "img{max-width:100%;margin:0.5em 0}</style></head><body>"]
  for s in sections:
    out.append(f"<h{s.level}>{e(s.title)}</h{s.level}>")
    for p in s.text:
      out.append(f"<p>{e(p)}</p>")
    if s.header:
      out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in s.header)
                 + "</tr></thead><tbody>")
      for row in s.rows:
        out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
      out.append("</tbody></table>")
    for path, alt in s.images:
      out.append(f"<img src='{e(path)}' alt='{e(alt)}'>")
  out.append("</body></html>")
  return "\n".join(out)


def _write_text(path: str, text: str) -> str:
  atomic.write_text(path, text)
  return path


def write_report(a: Analysis, out_dir: str, source: str = "",
                 html_too: bool = True) -> dict[str, str]:
  """Draws the plots and writes ``report.md`` (and ``report.html``).

  Returns:
    {"report.md": path, "report.html": path?, plot names: paths}.
  """
  plot_paths = make_plots(a, out_dir)
  sections = build_sections(a, plot_paths, out_dir, source)
  out = dict(plot_paths)
  out["report.md"] = _write_text(os.path.join(out_dir, "report.md"), to_markdown(sections))
  if html_too:
    out["report.html"] = _write_text(os.path.join(out_dir, "report.html"),
                                     to_html(sections))
  return out
