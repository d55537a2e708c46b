"""Report on a synthetic 26 models x 11 datasets x 4 protocols table."""

import csv
import os
import re

import numpy as np
import pytest
from scipy import stats as sps

from conftest import SHARED
import _synthetic as synthetic
from sslbench_jax.analysis import report
from sslbench_jax.analysis import summary
from sslbench_jax.analysis import table as table_lib

REFERENCE = os.path.join(SHARED, "reference")


def _reference_names():
  models_csv = os.path.join(REFERENCE, "models_26.csv")
  datasets_csv = os.path.join(REFERENCE, "datasets_11.csv")
  if not (os.path.exists(models_csv) and os.path.exists(datasets_csv)):
    pytest.skip(f"reference tables not found in {REFERENCE}")
  with open(models_csv) as f:
    models = [r["repo_key"] + ("_rn50" if r["backbone"].startswith("ResNet") else "_vitb16")
              for r in csv.DictReader(f)]
  with open(datasets_csv) as f:
    datasets = {r["repo_key"]: int(r["eval_size"]) for r in csv.DictReader(f)}
  return models, datasets


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  models, datasets = _reference_names()
  assert len(models) == 26 and len(set(models)) == 26 and len(datasets) == 11
  out = str(tmp_path_factory.mktemp("report"))
  rows = synthetic.synthetic_rows(models, datasets, seed=1)
  path = os.path.join(out, "results.csv")
  synthetic.write_csv(path, rows)
  t = table_lib.load_results(path)
  a = summary.analyze(t, n_boot=200, n_perm=200, seed=0)
  files = summary.write_tables(a, out)
  files.update(report.write_report(a, out, source=path))
  return {"rows": rows, "table": t, "analysis": a, "files": files, "out": out,
          "models": models, "datasets": list(datasets)}


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _md_table(md, heading):
  """Rows (lists of cells) of the first table after a heading line."""
  lines = md.splitlines()
  start = lines.index(heading)
  rows = []
  for line in lines[start + 1:]:
    if line.startswith("#"):
      break
    if line.startswith("|") and not line.startswith("|---"):
      rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
  return rows[0], rows[1:]


def test_files_exist_and_pngs_valid(built):
  out = built["out"]
  for name in ("aggregates", "correlations", "correlations_grouped",
               "correlation_matrix_pearson", "correlation_matrix_spearman",
               "correlation_matrix_kendall",
               "predictors", "bn_effect", "rank_changes", "published_comparison"):
    assert os.path.getsize(os.path.join(out, f"{name}.csv")) > 0
  for name in ("report.md", "report.html"):
    assert os.path.getsize(os.path.join(out, name)) > 1000
  pngs = [p for k, p in built["files"].items() if p.endswith(".png")]
  # heatmap + scatter + (bump + bars) per protocol
  assert len(pngs) == 2 + 2 * 4
  for p in pngs:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  html = open(os.path.join(out, "report.html")).read()
  md = open(os.path.join(out, "report.md")).read()
  for p in pngs:
    rel = os.path.relpath(p, out)
    assert rel in html and f"({rel})" in md
  assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_table_shapes(built):
  out = built["out"]
  agg = _read(os.path.join(out, "aggregates.csv"))
  assert len(agg) == 26 * 4 * 2  # suites: benchmark, imagenet_variants
  assert {r["suite"] for r in agg} == {"benchmark", "imagenet_variants"}
  assert {"model", "protocol", "mean", "weighted_mean", "geometric_mean",
          "mean_rank"} <= set(agg[0])
  assert {r["protocol"] for r in agg} == {"linear", "linear+bn", "knn", "finetune"}
  assert all(int(r["n_datasets"]) == (11 if r["suite"] == "benchmark" else 8) for r in agg)
  corr = _read(os.path.join(out, "correlations.csv"))
  assert {"x", "y", "method", "r", "ci_low", "ci_high", "p_value", "n_models"} <= set(corr[0])
  for r in corr:
    assert -1 <= float(r["r"]) <= 1 and 0 < float(r["p_value"]) <= 1
    assert float(r["ci_low"]) <= float(r["ci_high"])
    assert int(r["n_models"]) == 26
  # 12 columns (11 datasets + mean_ood) x 6 protocol pairs, 4 x 10 in vs out,
  # 4 x 4 in vs mean_ood, 4 x (7 variants + 2 variant aggregates) val vs
  # variant, each x 3 methods; + 4 partial rows.
  assert len(corr) == (12 * 6 + 4 * 10 + 4 * 4 + 4 * 9) * 3 + 4
  ranks = _read(os.path.join(out, "rank_changes.csv"))
  assert len(ranks) == 26 * 4 * 7
  matrix = _read(os.path.join(out, "correlation_matrix_kendall.csv"))
  assert len(matrix) == 4 * 12 and len(matrix[0]) == 4 * 12 + 1
  # Symmetric with unit diagonal.
  m = np.array([[float(r[c]) for c in list(r)[1:]] for r in matrix])
  np.testing.assert_allclose(m, m.T, atol=1e-12)
  np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)
  assert matrix[0]["column"] == "finetune/imagenet"
  assert len(_read(os.path.join(out, "predictors.csv"))) == 16
  assert len(_read(os.path.join(out, "bn_effect.csv"))) == 12 * 3  # all, ResNet, ViT
  grouped = _read(os.path.join(out, "correlations_grouped.csv"))
  assert {(r["group_by"], r["group"]) for r in grouped} == {
      ("backbone", "ResNet"), ("backbone", "ViT"),
      ("method_family", "discriminative"), ("method_family", "generative")}


def test_csv_numbers_equal_independent_recomputation(built):
  rows, out = built["rows"], built["out"]
  # Raw linear (no BN) values: model -> dataset -> (value, n)
  raw = {}
  for r in rows:
    if r["protocol"] == "linear" and r["hparams"] == "{}":
      raw.setdefault(r["model"], {})[r["dataset"]] = (r["value"], r["n_examples"])
  ds = built["datasets"]
  agg = {(r["model"], r["protocol"]): r for r in _read(os.path.join(out, "aggregates.csv"))
         if r["suite"] == "benchmark"}
  for m in built["models"]:
    v = np.array([raw[m][d][0] for d in ds])
    n = np.array([raw[m][d][1] for d in ds])
    got = agg[(m, "linear")]
    assert float(got["mean"]) == pytest.approx(v.mean(), abs=1e-9)
    assert float(got["weighted_mean"]) == pytest.approx(np.sum(v * n) / n.sum(), abs=1e-9)
    assert float(got["geometric_mean"]) == pytest.approx(sps.gmean(v), abs=1e-9)
  # Mean rank vs scipy rankdata per dataset.
  mat = np.array([[raw[m][d][0] for d in ds] for m in built["models"]])
  ranks = np.stack([sps.rankdata(-mat[:, j]) for j in range(len(ds))], axis=1)
  for i, m in enumerate(built["models"]):
    assert float(agg[(m, "linear")]["mean_rank"]) == pytest.approx(ranks[i].mean(), abs=1e-9)
  # In-domain vs mean OOD correlation vs scipy.
  x = mat[:, ds.index("imagenet")]
  y = np.delete(mat, ds.index("imagenet"), axis=1).mean(axis=1)
  corr = {(r["x"], r["y"], r["method"]): r for r in _read(os.path.join(out, "correlations.csv"))}
  key = ("linear/imagenet", "linear/mean_ood")
  assert float(corr[key + ("pearson",)]["r"]) == pytest.approx(sps.pearsonr(x, y)[0], abs=1e-12)
  assert float(corr[key + ("spearman",)]["r"]) == pytest.approx(sps.spearmanr(x, y)[0], abs=1e-12)
  assert float(corr[key + ("kendall",)]["r"]) == pytest.approx(sps.kendalltau(x, y)[0], abs=1e-12)
  # A matrix entry: linear/cub vs knn/pascal, Kendall, vs scipy on the raw rows.
  knn = {r["model"]: r["value"] for r in rows
         if r["protocol"] == "knn" and r["dataset"] == "pascal"}
  cub = [raw[m]["cub"][0] for m in built["models"]]
  pascal = [knn[m] for m in built["models"]]
  matrix = {r["column"]: r for r in _read(os.path.join(out, "correlation_matrix_kendall.csv"))}
  assert float(matrix["linear/cub"]["knn/pascal"]) == pytest.approx(
      sps.kendalltau(cub, pascal)[0], abs=1e-12)


def test_report_numbers_equal_analysis(built):
  a = built["analysis"]
  md = open(os.path.join(built["out"], "report.md")).read()
  header, body = _md_table(md, "### Aggregates: linear")
  assert header[:2] == ["model", "backbone"] and len(body) == 26
  agg = {r["model"]: r for r in a.aggregates
         if r["protocol"] == "linear" and r["suite"] == "benchmark"}
  for cells in body:
    r = agg[cells[0]]
    assert cells[4:] == [f"{r['mean']:.2f}", f"{r['weighted_mean']:.2f}",
                         f"{r['geometric_mean']:.2f}", f"{r['mean_rank']:.2f}"]
  header, body = _md_table(md, "## In-domain (ImageNet) vs mean out-of-domain accuracy")
  corr = {(r["x"], r["y"], r["method"]): r for r in a.correlations}
  assert len(body) == 4 * 4 * 3 + 4
  for cells in body:
    r = corr[tuple(cells[:3])]
    assert cells[3] == f"{r['r']:.3f}"
    assert cells[4] == f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    assert cells[5] == f"{r['p_value']:.4f}"
  header, body = _md_table(md, "### Rank changes from ImageNet val: knn")
  rc = {(r["model"], r["variant"]): r["rank_change"] for r in a.rank_changes
        if r["protocol"] == "knn"}
  variants = ["imagenet_real", "imagenet_v2", "imagenet_v2_threshold", "imagenet_v2_top",
              "imagenet_r", "imagenet_sketch", "imagenet_a"]
  assert len(body) == 26
  for cells in body:
    assert cells[2:] == [f"{rc[(cells[0], v)]:.2f}" for v in variants]
  header, body = _md_table(md, "## Comparison with published PyTorch numbers")
  assert len(body) == len(a.comparison) == 10  # 9 mapped models, DINO has linear + kNN
  unverified = {cells[0] for cells in body if cells[6] == "no"}
  assert unverified == {"simclr_rn50", "byol_rn50"}
  html = open(os.path.join(built["out"], "report.html")).read()
  first = agg[sorted(agg)[0]]
  assert f"<td>{first['mean']:.2f}</td>" in html
