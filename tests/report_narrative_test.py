"""Report prose and plot gating (issue 15): paragraphs computed from the tables,
one-line statements instead of empty plots when the results are too small."""

import csv
import os
import re

import numpy as np
import pytest
from scipy import stats as sps

from sslbench_jax.analysis import names
from sslbench_jax.analysis import report
from sslbench_jax.analysis import summary
from sslbench_jax.analysis import table as table_lib

SIZES = {"imagenet": 50000, "digits": 360, "cub": 5794, "imagenet_real": 46837,
         "imagenet_r": 30000, "imagenet_sketch": 50889}
PROTOCOLS = ("knn", "linear", "logreg")


def _rows(models, seed=0, protocols=PROTOCOLS):
  """Accuracy = dataset base + model quality + protocol noise (different
  qualities: a genuine ranking). kNN on digits is linear on digits - 5: the two
  rank the models identically there."""
  rng = np.random.default_rng(seed)
  quality = np.linspace(-20, 20, len(models)) + rng.normal(0, 1, len(models))
  base = {d: rng.uniform(40, 60) for d in SIZES}
  values = {}
  for p in protocols:
    for i, m in enumerate(models):
      for d in SIZES:
        values[(m, p, d)] = float(np.clip(base[d] + quality[i] + rng.normal(0, 6), 1, 99))
  if "knn" in protocols and "linear" in protocols:
    for m in models:
      values[(m, "knn", "digits")] = values[(m, "linear", "digits")] - 5.0
  return [{"model": m, "dataset": d, "split": "test", "protocol": p, "hparams": "{}",
           "metric": "top1", "value": repr(round(v, 4)), "n_examples": str(SIZES[d])}
          for (m, p, d), v in values.items()]


def _build(tmp_path, rows):
  t = table_lib.table_from_rows(rows)
  a = summary.analyze(t, n_boot=300, n_perm=300, seed=0)
  out = str(tmp_path)
  files = summary.write_tables(a, out)
  plot_paths = report.make_plots(a, out)
  sections = report.build_sections(a, plot_paths, out)
  files.update(report.write_report(a, out))
  return a, sections, files


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _pngs(out):
  pdir = os.path.join(out, "plots")
  return sorted(os.listdir(pdir)) if os.path.isdir(pdir) else []


def test_one_model_gets_one_line_statements_and_no_empty_figures(tmp_path):
  a, sections, files = _build(tmp_path, _rows(["efficientnet_lite0"]))
  by_title = {s.title: s for s in sections}
  for title in ("Benchmark lottery: ImageNet val vs its variants",
                "In-domain (ImageNet) vs mean out-of-domain accuracy",
                "Agreement between protocols"):
    s = by_title[title]
    assert len(s.text) == 1 and s.text[0].startswith("Not shown: "), (title, s.text)
    assert "the results hold 1" in s.text[0] and "\n" not in s.text[0]
    assert s.header is None and not s.images
  assert by_title["Effect of BatchNorm before the head"].text[0].startswith("Not shown: ")
  assert not any(t.startswith(("Lottery table", "Rank changes", "Rank agreement"))
                 for t in by_title)
  assert "Which in-domain protocol best predicts mean out-of-domain accuracy" not in by_title
  # One aggregates table (protocol x means), no per-protocol tables of rank 1.
  agg = by_title["Aggregates"]
  assert agg.text[0] == ("Not shown: a ranking needs 2 models; the results hold 1 model. "
                         "Its means are listed.")
  assert "mean rank" not in agg.header and [r[0] for r in agg.rows] == list(PROTOCOLS)
  assert not any(t.startswith("Aggregates: ") for t in by_title)
  # No heatmap, scatter or bump chart was drawn; what was drawn (one bar per
  # protocol with the model's ImageNet number) is in the report.
  pngs = _pngs(str(tmp_path))
  assert pngs == [f"imagenet_{p}.png" for p in PROTOCOLS]
  md = open(files["report.md"]).read()
  for p in pngs:
    assert f"(plots/{p})" in md
  assert md.count("Not shown: ") == 5
  assert "1 model, protocols: knn, linear, logreg;" in md


def test_two_models_rank_but_do_not_correlate(tmp_path):
  a, sections, _ = _build(tmp_path, _rows(["a_net", "b_net"]))
  by_title = {s.title: s for s in sections}
  # Ranks exist with 2 models: lottery tables and bump charts are drawn.
  assert "Lottery table: linear" in by_title and "rank_changes_linear.png" in _pngs(
      str(tmp_path))
  s = by_title["In-domain (ImageNet) vs mean out-of-domain accuracy"]
  assert s.text == ["Not shown: This comparison needs 3 models with ImageNet and every "
                    "out-of-domain dataset under one protocol; the results hold 2."]
  assert "indomain_vs_ood.png" not in _pngs(str(tmp_path))
  assert "correlation_heatmap.png" not in _pngs(str(tmp_path))


MODELS6 = ["effnet_lite0_final", "effnet_lite0_stage5", "effnet_lite0_stage4",
           "effnet_lite0_stage3", "random_resnet18_seed0", "random_vit_tiny_seed0"]


@pytest.fixture(scope="module")
def six(tmp_path_factory):
  out = tmp_path_factory.mktemp("six")
  rows = _rows(MODELS6, seed=3)
  a, sections, files = _build(out, rows)
  return {"out": str(out), "a": a, "sections": {s.title: s for s in sections},
          "files": files, "rows": rows}


def test_six_models_give_a_finite_correlation_matrix_with_intervals(six):
  out = six["out"]
  corr = _read(os.path.join(out, "correlations.csv"))
  assert corr and all(int(r["n_models"]) == 6 for r in corr)
  for r in corr:
    vals = [float(r[k]) for k in ("r", "ci_low", "ci_high", "p_value")]
    assert all(np.isfinite(vals)), r
    assert vals[1] <= vals[0] <= vals[2] and 0 < vals[3] <= 1
  for method in ("pearson", "spearman", "kendall"):
    m = _read(os.path.join(out, f"correlation_matrix_{method}.csv"))
    mat = np.array([[float(r[c]) for c in list(r)[1:]] for r in m])
    assert mat.shape[0] == mat.shape[1] >= 3 * 3
    assert np.all(np.isfinite(mat))
    off = mat[~np.eye(len(mat), dtype=bool)]
    assert np.ptp(off) > 0.1 and np.any(np.abs(off) < 0.999)  # not trivial
  # The matrix entry knn/cub vs logreg/imagenet equals SciPy on the raw rows.
  raw = {(r["model"], r["protocol"], r["dataset"]): float(r["value"]) for r in six["rows"]}
  x = [raw[(m, "knn", "cub")] for m in sorted(MODELS6)]
  y = [raw[(m, "logreg", "imagenet")] for m in sorted(MODELS6)]
  kendall = {r["column"]: r for r in _read(os.path.join(out, "correlation_matrix_kendall.csv"))}
  assert float(kendall["knn/cub"]["logreg/imagenet"]) == pytest.approx(
      sps.kendalltau(x, y)[0], abs=1e-12)
  pngs = _pngs(out)
  assert {"correlation_heatmap.png", "indomain_vs_ood.png"} <= set(pngs)
  assert {f"rank_changes_{p}.png" for p in PROTOCOLS} <= set(pngs)
  # Only 2 models have a known backbone (one ResNet, one ViT): one line, no table.
  grouped = six["sections"]["By backbone and method family"]
  assert grouped.text == ["Not shown: A within-group correlation needs 3 models of one "
                          "known backbone or method family; the results hold at most 1 "
                          "per group."] and grouped.header is None
  md = open(six["files"]["report.md"]).read()
  assert all(f"(plots/{p})" in md for p in pngs) and "Not shown" not in md.split(
      "## By backbone")[0]


_SPEARMAN = (r"Spearman (-?\d+\.\d{3}) \[(-?\d+\.\d{3}), (-?\d+\.\d{3})\], "
             r"permutation p = (\d\.\d{4}), (\d+) models")


def _fmt_row(r):
  return (f"{float(r['r']):.3f}", f"{float(r['ci_low']):.3f}", f"{float(r['ci_high']):.3f}",
          f"{float(r['p_value']):.4f}", str(int(r["n_models"])))


def test_agreement_paragraph_matches_the_csv(six):
  text = six["sections"]["Agreement between protocols"].text[0]
  corr = [r for r in _read(os.path.join(six["out"], "correlations.csv"))
          if r["method"] == "spearman"]
  display = {names.dataset_display(d): d for d in SIZES}
  display["mean out-of-domain"] = "mean_ood"
  sentences = re.findall(r"On ([^,]+?),? (\w+) and (\w+) (agree most|rank the 6 models "
                         r"identically|agree least), " + _SPEARMAN, text)
  assert sentences, text
  for shown, p, q, verb, *nums in sentences:
    d = display[shown]
    rows = [r for r in corr if r["x"].endswith("/" + d) and r["y"].endswith("/" + d)
            and r["x"].split("/")[0] != r["y"].split("/")[0]]
    row = next(r for r in rows if (r["x"], r["y"]) == (f"{p}/{d}", f"{q}/{d}"))
    assert _fmt_row(row) == tuple(nums)
    rs = [float(r["r"]) for r in rows]
    if verb == "agree least":
      assert float(row["r"]) == min(rs)
    else:
      assert float(row["r"]) == max(rs)
  # The table shows ImageNet and mean OOD: the identical kNN/linear ranking on
  # digits is in correlations.csv and SciPy agrees it is 1.
  row = next(r for r in corr if (r["x"], r["y"]) == ("knn/digits", "linear/digits"))
  raw = {(r["model"], r["protocol"]): float(r["value"]) for r in six["rows"]
         if r["dataset"] == "digits"}
  assert float(row["r"]) == pytest.approx(sps.spearmanr(
      [raw[(m, "knn")] for m in MODELS6], [raw[(m, "linear")] for m in MODELS6])[0])
  assert float(row["r"]) == pytest.approx(1.0)


def test_agreement_paragraph_says_identically_when_spearman_is_one(tmp_path):
  rows = [r for r in _rows(MODELS6, seed=3, protocols=("knn", "linear"))
          if r["dataset"] == "digits"]
  _, sections, _ = _build(tmp_path, rows)
  text = {s.title: s for s in sections}["Agreement between protocols"].text[0]
  assert text.startswith("On digits, knn and linear rank the 6 models identically, "
                         "Spearman 1.000 [1.000, 1.000], permutation p = ")


def test_lottery_and_ood_paragraphs_match_the_csvs(six):
  out, secs = six["out"], six["sections"]
  corr = {(r["x"], r["y"], r["method"]): r for r in _read(os.path.join(out, "correlations.csv"))}
  agg = [r for r in _read(os.path.join(out, "aggregates.csv"))
         if r["suite"] == "imagenet_variants" and r["protocol"] == "linear"]
  text = secs["Lottery table: linear"].text[0]
  m = re.search(r"Val vs the weighted mean over val \+ variants ranking: " + _SPEARMAN, text)
  row = corr[("linear/imagenet", "linear/variants_weighted_mean", "spearman")]
  assert m and m.groups() == _fmt_row(row)
  # Independently: SciPy's Spearman of val top-1 vs aggregates.csv's weighted mean.
  raw = {(r["model"], r["protocol"], r["dataset"]): float(r["value"]) for r in six["rows"]}
  val = [raw[(r["model"], "linear", "imagenet")] for r in agg]
  wmean = [float(r["weighted_mean"]) for r in agg]
  assert float(row["r"]) == pytest.approx(sps.spearmanr(val, wmean)[0], abs=1e-12)
  m = re.search(r"agrees least with (.+?)'s \(" + _SPEARMAN + r"\) and most with (.+?)'s \("
                + _SPEARMAN, text)
  assert m, text
  variant_rows = {names.dataset_display(v): corr[("linear/imagenet", f"linear/{v}", "spearman")]
                  for v in ("imagenet_real", "imagenet_r", "imagenet_sketch")}
  lo, hi = variant_rows[m.group(1)], variant_rows[m.group(7)]
  assert m.groups()[1:6] == _fmt_row(lo) and m.groups()[7:] == _fmt_row(hi)
  rs = [float(r["r"]) for r in variant_rows.values()]
  assert float(lo["r"]) == min(rs) and float(hi["r"]) == max(rs)
  best_val = min(agg, key=lambda r: -raw[(r["model"], "linear", "imagenet")])["model"]
  assert f"Best on val: {best_val}" in text
  # In-domain vs OOD paragraph: linear's Pearson equals the CSV row.
  text = secs["In-domain (ImageNet) vs mean out-of-domain accuracy"].text[0]
  row = corr[("linear/imagenet", "linear/mean_ood", "pearson")]
  assert (f"linear: Pearson {float(row['r']):.3f} [{float(row['ci_low']):.3f}, "
          f"{float(row['ci_high']):.3f}] (p = {float(row['p_value']):.4f})") in text


def test_aggregates_paragraph_matches_the_csv(six):
  agg = [r for r in _read(os.path.join(six["out"], "aggregates.csv"))
         if r["suite"] == "benchmark" and r["protocol"] == "knn"]
  best = min(agg, key=lambda r: (float(r["mean_rank"]), r["model"]))
  worst = max(agg, key=lambda r: (float(r["mean_rank"]), r["model"]))
  text = six["sections"]["Aggregates: knn"].text[0]
  assert text.startswith(
      f"Over 3 datasets, {best['model']} has the best mean rank "
      f"({float(best['mean_rank']):.2f}, mean {float(best['mean']):.2f}) and "
      f"{worst['model']} the worst ({float(worst['mean_rank']):.2f}, mean "
      f"{float(worst['mean']):.2f}) of 6 models."), text


def test_one_protocol_says_so_and_every_figure_is_in_the_report(tmp_path):
  _, sections, files = _build(tmp_path, _rows(MODELS6[:4], protocols=("linear",)))
  s = {s.title: s for s in sections}["Agreement between protocols"]
  assert s.text[0] == ("Not shown: Protocol agreement needs 2 protocols on one dataset; "
                       "the results hold protocols linear.")
  assert s.header is None
  # The dataset-vs-dataset heatmap is still drawn, and shown there.
  assert s.images == [("plots/correlation_heatmap.png", "correlation heatmap")]
  md = open(files["report.md"]).read()
  pngs = _pngs(str(tmp_path))
  assert "indomain_vs_ood.png" in pngs
  for p in pngs:
    assert f"(plots/{p})" in md, p
