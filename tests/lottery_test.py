"""The "benchmark lottery" analysis: ImageNet val + variants aggregates,
val-vs-variant correlations and rank agreement, checked against NumPy/SciPy
on a hand-made table."""

import os

import numpy as np
import pytest
from scipy import stats as sps

from sslbench_jax.analysis import aggregates
from sslbench_jax.analysis import correlations
from sslbench_jax.analysis import names
from sslbench_jax.analysis import table as table_lib

# Test-set sizes as the results rows store them (n_examples = images scored).
SIZES = {"imagenet2012": 50000, "imagenet2012_real": 46837,
         "imagenet_v2/matched-frequency": 10000, "imagenet_v2/threshold-0.7": 10000,
         "imagenet_v2/topimages": 10000, "imagenet_r": 30000, "imagenet_sketch": 50889,
         "imagenet_a": 7500, "cub": 5794}
CANON = {"imagenet2012": "imagenet", "imagenet2012_real": "imagenet_real",
         "imagenet_v2/matched-frequency": "imagenet_v2",
         "imagenet_v2/threshold-0.7": "imagenet_v2_threshold",
         "imagenet_v2/topimages": "imagenet_v2_top", "imagenet_r": "imagenet_r",
         "imagenet_sketch": "imagenet_sketch", "imagenet_a": "imagenet_a", "cub": "cub"}
MODELS = ["byol_rn50", "dino_rn50", "moco_v1_rn50", "obow_rn50", "pcl_v2_rn50",
          "simclr_rn50", "swav_rn50", "vicreg_rn50"]
# (8 models x 9 test sets), written by hand: ties (rows 2/3 on ReaL), a 0.0
# (ImageNet-A), and one missing cell (NaN: obow has no Sketch number).
VALUES = np.array([
    # val  ReaL  v2    v2thr v2top R     Sketch A    CUB
    [74.3, 81.0, 62.1, 70.4, 75.2, 24.0, 17.9, 1.9, 55.0],
    [75.3, 81.5, 63.0, 71.2, 76.0, 23.1, 16.0, 2.5, 60.1],
    [60.6, 81.5, 48.2, 57.7, 63.3, 16.0, 10.2, 0.0, 44.0],
    [73.8, 80.9, 61.5, 69.9, 74.0, 25.5, np.nan, 2.1, 57.3],
    [67.6, 75.0, 55.9, 64.1, 69.7, 19.8, 12.5, 1.1, 49.9],
    [69.1, 76.8, 56.0, 65.0, 70.5, 18.9, 13.0, 1.3, 50.2],
    [75.3, 82.0, 62.9, 71.5, 76.8, 22.3, 15.5, 2.4, 59.0],
    [73.2, 80.4, 61.0, 69.5, 74.4, 24.7, 18.2, 2.0, 56.6],
])
SETS = list(SIZES)


def _rows(protocols=("linear", "knn")):
  rows = []
  for p_i, p in enumerate(protocols):
    for i, m in enumerate(MODELS):
      for j, d in enumerate(SETS):
        if np.isnan(VALUES[i, j]):
          continue
        # The kNN numbers: a different, still hand-checkable matrix.
        v = VALUES[i, j] if p_i == 0 else VALUES[i, j] * (0.97 - 0.02 * i)
        split = "validation" if d.startswith("imagenet2012") else "test"
        rows.append({"model": m, "dataset": d, "split": split, "protocol": p,
                     "hparams": "{}", "metric": "top1", "value": repr(float(v)),
                     "n_examples": str(SIZES[d])})
  return rows


@pytest.fixture(scope="module")
def table():
  return table_lib.table_from_rows(_rows())


def _matrix(protocol, sets):
  cols = [SETS.index(s) for s in sets]
  v = VALUES[:, cols].copy()
  if protocol == "knn":
    v = v * (0.97 - 0.02 * np.arange(len(MODELS)))[:, None]
  return v


def test_suites_and_their_datasets(table):
  assert aggregates.suite_datasets(table, "benchmark") == ["imagenet", "cub"]
  assert aggregates.suite_datasets(table, "imagenet_variants") == [
      "imagenet", "imagenet_real", "imagenet_v2", "imagenet_v2_threshold",
      "imagenet_v2_top", "imagenet_r", "imagenet_sketch", "imagenet_a"]
  with pytest.raises(ValueError, match="unknown suite 'x'"):
    aggregates.suite_datasets(table, "x")
  no_variants = table_lib.table_from_rows(
      [r for r in _rows() if CANON[r["dataset"]] in ("imagenet", "cub")])
  assert aggregates.suite_datasets(no_variants, "imagenet_variants") == []
  assert {r["suite"] for r in aggregates.aggregates(no_variants)} == {"benchmark"}


@pytest.mark.parametrize("protocol", ["linear", "knn"])
@pytest.mark.parametrize("suite,sets", [
    ("benchmark", ["imagenet2012", "cub"]),
    ("imagenet_variants", SETS[:-1]),
])
def test_suite_aggregates_equal_numpy_scipy(table, protocol, suite, sets):
  rows = {r["model"]: r for r in aggregates.aggregates(table)
          if r["suite"] == suite and r["protocol"] == protocol}
  assert sorted(rows) == MODELS
  v = _matrix(protocol, sets)
  w = np.array([SIZES[s] for s in sets], float)
  # Per-dataset ranks (1 = best, ties averaged) among the models present.
  ranks = np.full(v.shape, np.nan)
  for j in range(v.shape[1]):
    ok = ~np.isnan(v[:, j])
    ranks[ok, j] = sps.rankdata(-v[ok, j])
  for i, m in enumerate(MODELS):
    ok = ~np.isnan(v[i])
    got = rows[m]
    assert got["n_datasets"] == ok.sum()
    assert got["mean"] == pytest.approx(np.mean(v[i, ok]), abs=1e-10)
    assert got["weighted_mean"] == pytest.approx(np.average(v[i, ok], weights=w[ok]),
                                                 abs=1e-10)
    with np.errstate(divide="ignore"):
      assert got["geometric_mean"] == pytest.approx(sps.gmean(v[i, ok]), abs=1e-10)
    assert got["mean_rank"] == pytest.approx(np.mean(ranks[i, ok]), abs=1e-10)
  if suite == "imagenet_variants":
    assert rows["obow_rn50"]["n_datasets"] == 7  # no Sketch number
    assert rows["moco_v1_rn50"]["geometric_mean"] == 0.0  # 0.0 on ImageNet-A


def test_val_vs_variant_correlations_equal_scipy(table):
  rows = correlations.correlation_table(table, n_boot=300, n_perm=300, seed=0)
  by = {(r["x"], r["y"], r["method"]): r for r in rows}
  for protocol in ("linear", "knn"):
    for s in SETS[1:-1]:
      variant = CANON[s]
      x, y = _matrix(protocol, ["imagenet2012", s]).T
      ok = ~np.isnan(x) & ~np.isnan(y)
      for method, ref in (("pearson", sps.pearsonr), ("spearman", sps.spearmanr),
                          ("kendall", sps.kendalltau)):
        r = by[(f"{protocol}/imagenet", f"{protocol}/{variant}", method)]
        assert r["r"] == pytest.approx(ref(x[ok], y[ok])[0], abs=1e-12), (protocol, s, method)
        assert r["n_models"] == ok.sum()
        assert r["ci_low"] <= r["r"] + 1e-12 and r["r"] - 1e-12 <= r["ci_high"]
        assert 0 < r["p_value"] <= 1
    # Val vs the weighted / geometric mean over val + variants, among the
    # models with every one of those numbers (obow lacks Sketch).
    v = _matrix(protocol, SETS[:-1])
    ok = ~np.isnan(v).any(axis=1)
    assert ok.sum() == 7
    w = np.array([SIZES[s] for s in SETS[:-1]], float)
    with np.errstate(divide="ignore"):
      aggs = {"variants_weighted_mean": v[ok] @ w / w.sum(),
              "variants_geometric_mean": sps.gmean(v[ok], axis=1)}
    for name, agg in aggs.items():
      for method, ref in (("spearman", sps.spearmanr), ("kendall", sps.kendalltau)):
        r = by[(f"{protocol}/imagenet", f"{protocol}/{name}", method)]
        assert r["r"] == pytest.approx(ref(v[ok, 0], agg)[0], abs=1e-12)
        assert r["n_models"] == 7


def test_rank_correlation_of_val_ranking_with_each_variant_ranking(table):
  """Spearman/Kendall rows of val vs a variant are the rank correlations of the
  two rankings (rank_changes.csv's rank_imagenet vs rank_variant)."""
  corr = {(r["x"], r["y"], r["method"]): r["r"]
          for r in correlations.correlation_table(table, n_boot=0, n_perm=0)}
  ranks = aggregates.rank_changes(table)
  for variant in names.VARIANTS:
    rr = [r for r in ranks if r["protocol"] == "linear" and r["variant"] == variant]
    a = [r["rank_imagenet"] for r in rr]
    b = [r["rank_variant"] for r in rr]
    assert corr[("linear/imagenet", f"linear/{variant}", "spearman")] == pytest.approx(
        sps.spearmanr(a, b)[0], abs=1e-12)
    assert corr[("linear/imagenet", f"linear/{variant}", "kendall")] == pytest.approx(
        sps.kendalltau(a, b)[0], abs=1e-12)


def test_lottery_report_section(table, tmp_path):
  from sslbench_jax.analysis import report
  from sslbench_jax.analysis import summary
  a = summary.analyze(table, n_boot=100, n_perm=100, seed=0)
  files = report.write_report(a, str(tmp_path), html_too=False)
  md = open(files["report.md"]).read().splitlines()
  start = md.index("### Lottery table: linear")
  lines = [ln for ln in md[start + 1:md.index("### Rank agreement with ImageNet val: linear")]
           if ln.startswith("| ") and not ln.startswith("| model")]
  cells = {ln.split(" | ")[0][2:]: [c.strip() for c in ln.strip("| ").split(" | ")]
           for ln in lines}
  assert sorted(cells) == MODELS
  v = _matrix("linear", SETS[:-1])
  w = np.array([SIZES[s] for s in SETS[:-1]], float)
  ranks = np.full(v.shape, np.nan)
  for j in range(v.shape[1]):
    ok = ~np.isnan(v[:, j])
    ranks[ok, j] = sps.rankdata(-v[ok, j])
  wmean = np.array([np.average(v[i, ~np.isnan(v[i])], weights=w[~np.isnan(v[i])])
                    for i in range(len(MODELS))])
  with np.errstate(divide="ignore"):
    gmean = np.array([sps.gmean(v[i, ~np.isnan(v[i])]) for i in range(len(MODELS))])
  wrank, grank = sps.rankdata(-wmean), sps.rankdata(-gmean)
  for i, m in enumerate(MODELS):
    row = cells[m]
    for j in range(v.shape[1]):
      want = "–" if np.isnan(v[i, j]) else f"{v[i, j]:.2f} ({ranks[i, j]:g})"
      assert row[1 + j] == want, (m, SETS[j])
    assert row[1 + v.shape[1]] == f"{wmean[i]:.2f} ({wrank[i]:g})"
    assert row[2 + v.shape[1]] == f"{gmean[i]:.2f} ({grank[i]:g})"
  # Rows in val order: ties (dino, swav at 75.3) share rank 1.5.
  assert [ln.split(" | ")[0][2:] for ln in lines][:2] == ["dino_rn50", "swav_rn50"]
  text = md[start + 2]
  assert "Best on val: dino_rn50, swav_rn50" in text
  # Rank agreement table: one row per variant + the two means, Spearman vs SciPy.
  start = md.index("### Rank agreement with ImageNet val: linear")
  rows = [ln for ln in md[start + 1:md.index("### Rank changes from ImageNet val: linear")]
          if ln.startswith("| ") and not ln.startswith("| ranking")]
  assert len(rows) == 7 + 2
  real = next(ln for ln in rows if ln.startswith("| ImageNet ReaL |"))
  rho = sps.spearmanr(v[:, 0], v[:, 1])[0]
  assert real.split(" | ")[1] == f"{rho:.3f}"
  assert "rank_changes_linear.png" in os.listdir(tmp_path / "plots")
