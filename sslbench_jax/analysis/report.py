"""Markdown / HTML report: the analysis tables plus PNG plots.

Both formats are rendered from one list of ``Section``s, so they show the
same numbers (accuracies to 2 decimals, correlations to 3, p-values to 4).
"""

from __future__ import annotations

import dataclasses
import html
import os

import numpy as np

from sslbench_jax import atomic

from sslbench_jax.analysis import _narrative
from sslbench_jax.analysis import aggregates
from sslbench_jax.analysis import correlations
from sslbench_jax.analysis import names
from sslbench_jax.analysis import plots
from sslbench_jax.analysis import stats
from sslbench_jax.analysis import table as table_lib
from sslbench_jax.analysis.summary import Analysis
from sslbench_jax.metrics import primary as primary_lib


@dataclasses.dataclass
class Section:
  """A titled block: paragraphs, optional table, optional images."""
  title: str
  text: list[str] = dataclasses.field(default_factory=list)
  header: list[str] | None = None
  rows: list[list[str]] = dataclasses.field(default_factory=list)
  images: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, alt)
  level: int = 2


fmt = _narrative.fmt
_ci = _narrative.ci


def _corr_rows(rows):
  return [[r["x"], r["y"], r["method"], fmt(r["r"], 3), _ci(r), fmt(r["p_value"], 4),
           fmt(r["n_models"])] for r in rows]


_CORR_HEADER = ["x", "y", "method", "r", "95% CI", "p (perm.)", "n models"]


# ------------------------------------------------- what each plot needs


def _ood_points(t, protocol: str) -> int:
  x = correlations.column(t, f"{protocol}/{names.IN_DOMAIN}")
  y = correlations.column(t, f"{protocol}/{correlations.MEAN_OOD}")
  return int(np.sum(np.isfinite(x) & np.isfinite(y)))


def scatter_protocols(t) -> list[str]:
  """Protocols with enough models for an in-domain vs OOD panel (a fitted line)."""
  if names.IN_DOMAIN not in t.benchmark_datasets or not t.ood_datasets:
    return []
  return [p for p in t.protocols
          if _ood_points(t, p) >= _narrative.MIN_CORRELATION_MODELS]


def _has_heatmap(a: Analysis) -> bool:
  """A correlation matrix with at least one defined off-diagonal entry."""
  m = a.matrix
  if len(a.matrix_columns) < 2:
    return False
  off = ~np.eye(len(m), dtype=bool)
  return bool(np.any(np.isfinite(m[off])))


def _lottery_models(a: Analysis, protocol: str) -> list[str]:
  return sorted({r["model"] for r in a.rank_changes if r["protocol"] == protocol})


def make_plots(a: Analysis, out_dir: str) -> dict[str, str]:
  """Draws every plot that has data into ``out_dir/plots``; returns {name: path}.

  A plot that would be empty or degenerate (a heatmap with no defined
  correlation, a scatter panel without 3 models, a bump chart of one model)
  is not drawn; the report says why in one line instead.
  """
  pdir = os.path.join(out_dir, "plots")
  t = a.table
  out = {}
  if _has_heatmap(a):
    out["heatmap"] = plots.correlation_heatmap(
        a.matrix_columns, a.matrix, os.path.join(pdir, "correlation_heatmap.png"),
        a.matrix_method)
  protos = scatter_protocols(t)
  if protos:
    out["scatter"] = plots.indomain_vs_ood_scatter(
        t, protos, os.path.join(pdir, "indomain_vs_ood.png"))
  for p in t.protocols:
    if len(_lottery_models(a, p)) >= _narrative.MIN_RANKING_MODELS:
      out[f"bump/{p}"] = plots.bump_chart(
          a.rank_changes, p, os.path.join(pdir, f"rank_changes_{plots.safe_name(p)}.png"))
    if any((m, p, names.IN_DOMAIN) in t.values for m in t.models):
      out[f"bars/{p}"] = plots.protocol_bars(
          t, p, a.comparison, os.path.join(pdir, f"imagenet_{plots.safe_name(p)}.png"))
  return out


# ------------------------------------------------------------- sections


def lottery_table(a: Analysis, protocol: str) -> tuple[list[str], list[dict]]:
  """Models x (ImageNet val + variants) under one protocol, with ranks.

  Returns:
    (test sets, rows): rows hold ``model``, ``values`` / ``ranks`` (per test
    set; ranks among the models with that number, 1 = best), the
    ``imagenet_variants`` suite's ``weighted_mean`` / ``geometric_mean`` /
    ``mean_rank`` / ``n_datasets`` and the ranks of the two means
    (``wmean_rank``, ``gmean_rank``) and of val (``val_rank``); sorted by val
    rank.
  """
  t = a.table
  sets = aggregates.suite_datasets(t, aggregates.IMAGENET_VARIANTS)
  models = _lottery_models(a, protocol)
  if not sets or not models:
    return sets, []
  v, _ = t.matrix(protocol, sets, models)
  ranks = stats.average_ranks(v.T, descending=True).T
  agg = {r["model"]: r for r in a.aggregates
         if r["suite"] == aggregates.IMAGENET_VARIANTS and r["protocol"] == protocol}
  wm = np.array([agg[m]["weighted_mean"] for m in models])
  gm = np.array([agg[m]["geometric_mean"] for m in models])
  wr = stats.average_ranks(wm, descending=True)
  gr = stats.average_ranks(gm, descending=True)
  val = sets.index(names.IN_DOMAIN) if names.IN_DOMAIN in sets else None
  rows = []
  for i, m in enumerate(models):
    rows.append({"model": m, "values": v[i], "ranks": ranks[i],
                 "val_rank": float(ranks[i, val]) if val is not None else float("nan"),
                 "weighted_mean": wm[i], "geometric_mean": gm[i],
                 "wmean_rank": float(wr[i]), "gmean_rank": float(gr[i]),
                 "mean_rank": agg[m]["mean_rank"], "n_datasets": agg[m]["n_datasets"]})
  rows.sort(key=lambda r: (np.nan_to_num(r["val_rank"], nan=1e9), r["model"]))
  return sets, rows


def _lottery_sections(a: Analysis, plot_paths, rel) -> list[Section]:
  t = a.table
  variants = correlations.variants_present(t)
  intro = ("Does an ImageNet-val gain carry over to ReaL, v2, R, Sketch and A? "
           "Per protocol: every model's accuracy and rank (1 = best, ties averaged, "
           "among the models with that number) on val and each variant, the ranking "
           "by the size-weighted mean (weights: test-set sizes, the rows' "
           "n_examples) and by the geometric mean over val + variants "
           "(aggregates.csv, suite imagenet_variants), rank correlations with the "
           "val ranking and rank changes.")
  head = Section("Benchmark lottery: ImageNet val vs its variants", text=[intro])
  if not variants or names.IN_DOMAIN not in t.datasets:
    head.text = [_narrative.too_few(
        "The benchmark lottery", "ImageNet val and at least one ImageNet variant "
        "(ReaL, v2, R, Sketch, A)",
        "test sets " + (", ".join(t.datasets) or "none"))]
    return [head]
  secs = [head]
  shown_any = False
  for p in t.protocols:
    sets, rows = lottery_table(a, p)
    if len(rows) < _narrative.MIN_RANKING_MODELS:
      continue
    shown_any = True
    corr = [r for r in a.correlations if r["x"] == f"{p}/{names.IN_DOMAIN}"
            and r["y"].rpartition("/")[2] in variants +
            [correlations.VARIANTS_WMEAN, correlations.VARIANTS_GMEAN]]
    spear = [r for r in corr if r["method"] == "spearman"]
    cell = lambda v, r: f"{fmt(v)} ({r:g})" if np.isfinite(r) else fmt(v)  # noqa: E731
    secs.append(Section(
        f"Lottery table: {p}", level=3,
        text=[_narrative.lottery_text(spear, rows),
              "Cells: accuracy (rank). A model missing a test set is aggregated over "
              "the ones it has (n)."],
        header=(["model"] + [names.dataset_display(d) for d in sets] +
                ["weighted mean (rank)", "geometric mean (rank)", "mean rank", "n"]),
        rows=[[r["model"]] + [cell(r["values"][j], r["ranks"][j]) for j in range(len(sets))]
              + [cell(r["weighted_mean"], r["wmean_rank"]),
                 cell(r["geometric_mean"], r["gmean_rank"]),
                 fmt(r["mean_rank"]), fmt(r["n_datasets"])] for r in rows]))
    kendall = {r["y"]: r for r in corr if r["method"] == "kendall"}
    secs.append(Section(
        f"Rank agreement with ImageNet val: {p}", level=3,
        text=["Rank correlation across models of the val ranking with each variant's "
              "ranking and with the rankings by the two means (models with both "
              "numbers; the means only for models with every test set)."],
        header=["ranking", "Spearman ρ", "95% CI", "p (perm.)", "Kendall τ", "95% CI",
                "n models"],
        rows=[[_narrative.shown(r["y"].rpartition("/")[2]), fmt(r["r"], 3), _ci(r),
               fmt(r["p_value"], 4), fmt(kendall[r["y"]]["r"], 3), _ci(kendall[r["y"]]),
               fmt(r["n_models"])] for r in spear]))
    rc = [r for r in a.rank_changes if r["protocol"] == p]
    vs = [v for v in names.VARIANTS if any(r["variant"] == v for r in rc)]
    by_model: dict[str, dict] = {}
    for r in rc:
      by_model.setdefault(r["model"], {"rank": r["rank_imagenet"]})[r["variant"]] = r["rank_change"]
    order = sorted(by_model, key=lambda m: (by_model[m]["rank"], m))
    key = f"bump/{p}"
    secs.append(Section(
        f"Rank changes from ImageNet val: {p}", level=3,
        text=[_narrative.rank_change_text(rc),
              "Rank change = rank on the variant - rank on ImageNet val "
              "(positive: falls behind); ranks among the models with both numbers."],
        header=["model", "ImageNet rank"] + [f"Δ {names.dataset_display(v)}" for v in vs],
        rows=[[m, fmt(by_model[m]["rank"])] +
              [fmt(by_model[m].get(v, float("nan"))) for v in vs] for m in order],
        images=[(rel(plot_paths[key]), f"rank changes {p}")] if key in plot_paths else []))
  if not shown_any:
    n = max((len(_lottery_models(a, p)) for p in t.protocols), default=0)
    head.text = [_narrative.too_few(
        "The benchmark lottery", f"{_narrative.MIN_RANKING_MODELS} models with ImageNet "
        "val and a variant under one protocol", f"{n}")]
  return secs


def build_sections(a: Analysis, plot_paths: dict[str, str], out_dir: str,
                   source: str = "") -> list[Section]:
  """The report's content as sections (tables formatted as strings).

  Each section opens with a generated paragraph saying what its numbers show
  (``_narrative``); a section the results cannot fill says so in one line.
  """
  t = a.table
  rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
  n_models = len(t.models)
  secs = [Section("sslbench_jax analysis report", level=1, text=[
      f"Source: `{source}`; metric: `{t.metric}` (percent)." +
      (f" Primary = each test set's main metric: {primary_lib.DESCRIPTION}."
       if t.metric == table_lib.PRIMARY else ""),
      f"{n_models} model{'' if n_models == 1 else 's'}, protocols: "
      f"{', '.join(t.protocols)}; "
      f"benchmark datasets ({len(t.benchmark_datasets)}): "
      f"{', '.join(t.benchmark_datasets)}; ImageNet variants: "
      f"{', '.join(d for d in t.datasets if d in names.VARIANTS) or 'none'}.",
      f"Intervals: percentile bootstrap over models ({a.n_boot} resamples, seed "
      f"{a.seed}); p-values: two-sided permutation tests ({a.n_perm} "
      "permutations, (count+1)/(n+1)). Mean OOD = mean over the out-of-domain "
      "datasets (models missing one are left out of comparisons using it)."])]

  # Aggregates (benchmark suite; the variants suite is in the lottery section).
  n_bench = len(t.benchmark_datasets)
  bench = [r for r in a.aggregates if r["suite"] == aggregates.BENCHMARK]
  note = ("Over the benchmark datasets present (ImageNet val and transfer "
          f"datasets, {n_bench}); weighted mean uses n_examples; ranks per dataset "
          "(1 = best, ties averaged).")
  if n_models < _narrative.MIN_RANKING_MODELS:
    # One model: no ranking; its means per protocol in one table.
    secs.append(Section(
        "Aggregates", level=3,
        text=[_narrative.aggregates_text(bench[:n_models], n_bench), note],
        header=["protocol", "model", "datasets", "mean", "weighted mean",
                "geometric mean"],
        rows=[[r["protocol"], r["model"], fmt(r["n_datasets"]), fmt(r["mean"]),
               fmt(r["weighted_mean"]), fmt(r["geometric_mean"])] for r in bench]))
  for p in t.protocols if n_models >= _narrative.MIN_RANKING_MODELS else ():
    rows = sorted((r for r in bench if r["protocol"] == p),
                  key=lambda r: (r["mean_rank"], r["model"]))
    if not rows:
      continue
    secs.append(Section(
        f"Aggregates: {p}", level=3,
        text=[_narrative.aggregates_text(rows, max(r["n_datasets"] for r in rows)), note],
        header=["model", "backbone", "method family", "datasets", "mean",
                "weighted mean", "geometric mean", "mean rank"],
        rows=[[r["model"], r["backbone"], r["method_family"], fmt(r["n_datasets"]),
               fmt(r["mean"]), fmt(r["weighted_mean"]), fmt(r["geometric_mean"]),
               fmt(r["mean_rank"])] for r in rows]))

  secs += _lottery_sections(a, plot_paths, rel)

  # In-domain vs out-of-domain.
  title = "In-domain (ImageNet) vs mean out-of-domain accuracy"
  ind = f"/{names.IN_DOMAIN}"
  ood_rows = [r for r in a.correlations
              if r["x"].endswith(ind) and r["y"].endswith("/" + correlations.MEAN_OOD)]
  n_ood = max((r["n_models"] for r in ood_rows), default=0)
  if names.IN_DOMAIN not in t.benchmark_datasets or not t.ood_datasets:
    secs.append(Section(title, text=[_narrative.too_few(
        "This comparison", "ImageNet val and an out-of-domain dataset under one protocol",
        "datasets " + (", ".join(t.benchmark_datasets) or "none"))]))
  elif n_ood < _narrative.MIN_CORRELATION_MODELS:
    secs.append(Section(title, text=[_narrative.too_few(
        "This comparison", f"{_narrative.MIN_CORRELATION_MODELS} models with ImageNet and "
        "every out-of-domain dataset under one protocol", f"{n_ood}")]))
  else:
    secs.append(Section(
        title,
        text=[_narrative.ood_text(ood_rows),
              "Across models; `pearson_partial_backbone` residualises both sides "
              "on a ViT/ResNet indicator."],
        header=_CORR_HEADER, rows=_corr_rows(ood_rows),
        images=[(rel(plot_paths["scatter"]), "in-domain vs out-of-domain")]
        if "scatter" in plot_paths else []))
    if any(np.isfinite(r["loo_rmse"]) for r in a.predictors):
      secs.append(Section(
          "Which in-domain protocol best predicts mean out-of-domain accuracy",
          text=[_narrative.predictors_text(a.predictors),
                "Leave-one-model-out error of a linear fit target ~ a + b * predictor "
                "(accuracy points)."],
          header=["target", "predictor", "LOO RMSE", "LOO MAE", "n models", "best"],
          rows=[[r["target"], r["predictor"], fmt(r["loo_rmse"]), fmt(r["loo_mae"]),
                 fmt(r["n_models"]), fmt(r["best"])] for r in a.predictors]))

  # Protocol agreement (ImageNet and mean OOD in the table when ImageNet is
  # present, else every dataset; all of them in correlations.csv).
  title = "Agreement between protocols"
  same = [r for r in a.correlations
          if r["method"] != "pearson_partial_backbone"
          and r["x"].rpartition("/")[0] != r["y"].rpartition("/")[0]
          and r["x"].rpartition("/")[2] == r["y"].rpartition("/")[2]]
  shown_sets = ((names.IN_DOMAIN, correlations.MEAN_OOD)
                if names.IN_DOMAIN in t.benchmark_datasets else t.benchmark_datasets)
  agree = [r for r in same if r["x"].rpartition("/")[2] in shown_sets]
  n_agree = max((r["n_models"] for r in agree), default=0)
  heatmap = ([(rel(plot_paths["heatmap"]), "correlation heatmap")]
             if "heatmap" in plot_paths else [])
  if len(t.protocols) < 2 or not agree:
    # The heatmap still compares the datasets (columns) across models.
    secs.append(Section(title, text=[_narrative.too_few(
        "Protocol agreement", "2 protocols on one dataset",
        f"protocols {', '.join(t.protocols)}")] + (
            [f"Heatmap: {a.matrix_method} correlation across models between the "
             "protocol/dataset columns (correlation_matrix_<method>.csv)."]
            if heatmap else []), images=heatmap))
  elif n_agree < _narrative.MIN_CORRELATION_MODELS:
    secs.append(Section(title, text=[_narrative.too_few(
        "Protocol agreement (correlations across models, heatmap)",
        f"{_narrative.MIN_CORRELATION_MODELS} models with both protocols on one dataset",
        f"{n_agree}")]))
  else:
    secs.append(Section(
        title,
        text=[_narrative.agreement_text(agree),
              "Every protocol pair on every dataset: correlations.csv. "
              + (f"Heatmap: {a.matrix_method} correlation between all protocol/dataset "
                 "columns (correlation_matrix_<method>.csv)." if "heatmap" in plot_paths
                 else "No heatmap: no pair of protocol/dataset columns has a defined "
                      "correlation.")],
        header=_CORR_HEADER, rows=_corr_rows(agree), images=heatmap))
  if any(np.isfinite(r["r"]) for r in a.grouped):
    secs.append(Section(
        "By backbone and method family",
        text=[_narrative.grouped_text(a.grouped), "In-domain vs mean OOD within each group."],
        header=["group by", "group"] + _CORR_HEADER,
        rows=[[r["group_by"], r["group"]] + _corr_rows([r])[0] for r in a.grouped]))
  elif a.grouped:
    n = max(r["n_models"] for r in a.grouped)
    secs.append(Section("By backbone and method family", text=[_narrative.too_few(
        "A within-group correlation", f"{_narrative.MIN_CORRELATION_MODELS} models of "
        "one known backbone or method family", f"at most {n} per group")]))
  title = "Effect of BatchNorm before the head"
  if a.bn_effect:
    secs.append(Section(
        title,
        text=[_narrative.bn_text(a.bn_effect),
              "Paired difference (with BN minus without) across models, accuracy "
              "points; sign-flip permutation p-value."],
        header=["protocol", "dataset", "group", "mean diff", "95% CI", "p (perm.)",
                "n models", "improved"],
        rows=[[r["protocol"], r["dataset"], r["group"], fmt(r["mean_diff"]),
               _ci(r), fmt(r["p_value"], 4),
               fmt(r["n_models"]), fmt(r["n_improved"])] for r in a.bn_effect]))
  else:
    secs.append(Section(title, text=[_narrative.too_few(
        "The BatchNorm effect", "a protocol run with and without BatchNorm before the "
        "head (p and p+bn) for the same models", f"protocols {', '.join(t.protocols)}")]))

  # Published baselines.
  if a.comparison:
    secs.append(Section(
        "Comparison with published PyTorch numbers",
        text=[_narrative.comparison_text(a.comparison),
              "ImageNet top-1; delta = ours - published. Rows marked unverified come "
              "from memory in the source table."],
        header=["model", "protocol", "ours", "published", "delta", "published as",
                "verified", "note"],
        rows=[[r["model"], r["protocol"], fmt(r["ours"]), fmt(r["published"]),
               fmt(r["delta"]), r["published_method"], fmt(r["verified"]), r["note"]]
              for r in a.comparison]))
  else:
    secs.append(Section("Comparison with published PyTorch numbers", text=[
        "No model name matches a published baseline (frameworks known: "
        "analysis/names.py; published numbers: published_baselines.csv)."]))
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
