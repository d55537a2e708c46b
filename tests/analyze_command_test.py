"""``sslbench-jax analyze`` / ``report`` end to end through the CLI."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

import _synthetic as synthetic
from sslbench_jax.analysis import _command_common
from sslbench_jax.analysis import table as table_lib
from sslbench_jax.results import store

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = ["dino_rn50", "swav_rn50", "moco_v2_rn50", "byol_rn50", "simclr_rn50",
          "dino_vitb16", "mae_vitb16", "ibot_vitb16", "eva_vitb16"]
DATASETS = {"imagenet": 50000, "cub": 5794, "cifar100": 10000, "pascal": 1449}


def _cli(*args):
  env = dict(os.environ, MPLBACKEND="Agg")
  return subprocess.run([sys.executable, "-m", "sslbench_jax.cli", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_analyze_command_outputs(tmp_path):
  rows = synthetic.synthetic_rows(MODELS, DATASETS, seed=3,
                                  protocols=(("linear", {}), ("knn", {"k": 20})))
  results = str(tmp_path / "results.csv")
  synthetic.write_csv(results, rows)
  out = tmp_path / "out"
  proc = _cli("analyze", f"--results={results}", f"--out={out}", "--n_boot=100",
              "--n_perm=100")
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in ("aggregates.csv", "correlations.csv", "rank_changes.csv", "report.md",
               "plots/correlation_heatmap.png", "plots/indomain_vs_ood.png",
               "plots/rank_changes_linear.png", "plots/imagenet_knn.png"):
    assert (out / name).stat().st_size > 0, name
  assert not (out / "report.html").exists()
  agg = _read(out / "aggregates.csv")
  assert len(agg) == len(MODELS) * 2 * 2  # 2 protocols x 2 suites
  # Arithmetic mean over the 4 benchmark datasets (variants excluded).
  r = next(r for r in agg if r["model"] == "mae_vitb16" and r["protocol"] == "knn"
           and r["suite"] == "benchmark")
  vals = [x["value"] for x in rows if x["model"] == "mae_vitb16" and x["protocol"] == "knn"
          and x["dataset"] in DATASETS]
  assert float(r["mean"]) == pytest.approx(np.mean(vals), abs=1e-9)
  corr = _read(out / "correlations.csv")
  c = next(r for r in corr if (r["x"], r["y"], r["method"]) ==
           ("knn/imagenet", "linear/imagenet", "kendall"))  # protocols sorted
  x = [next(v["value"] for v in rows if v["model"] == m and v["protocol"] == p
            and v["dataset"] == "imagenet") for p in ("linear", "knn") for m in MODELS]
  assert float(c["r"]) == pytest.approx(sps.kendalltau(x[9:], x[:9])[0], abs=1e-12)
  assert int(c["n_models"]) == len(MODELS)


def test_report_command_from_jsonl_store(tmp_path):
  rows = synthetic.synthetic_rows(MODELS[:6], {"imagenet": 50000, "cub": 5794}, seed=4,
                                  with_variants=False, protocols=(("linear", {}),))
  path = str(tmp_path / "store.jsonl")
  store.append_results(path, [{k: v for k, v in r.items()} for r in rows])
  out = tmp_path / "rep"
  proc = _cli("report", f"--results={path}", f"--out={out}", "--n_boot=50", "--n_perm=50")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (out / "report.html").stat().st_size > 0
  md = (out / "report.md").read_text()
  assert "### Aggregates: linear" in md and "dino_rn50" in md
  assert not (out / "rank_changes.csv").read_text().strip().count("\n")  # header only


def test_bad_input_gives_one_line_error(tmp_path):
  proc = _cli("analyze", f"--results={tmp_path / 'missing.csv'}", f"--out={tmp_path}")
  assert proc.returncode == 2  # bad input (the CLI's exit-code convention)
  assert proc.stderr.strip().splitlines()[-1].endswith(
      f"analyze: error: results file not found: {tmp_path / 'missing.csv'}")
  assert "Traceback" not in proc.stderr
  bad = tmp_path / "bad.csv"
  bad.write_text("model,dataset,split,protocol,metric,value,n_examples\n"
                 "m,imagenet,val,linear,top5,50,10\n")
  proc = _cli("report", f"--results={bad}", f"--out={tmp_path / 'o'}")
  assert proc.returncode == 2
  assert "no rows with metric 'top1'; metrics present: ['top5']" in proc.stderr


# Three models whose ranking changes from ImageNet val to ReaL / R / A. The
# unrestricted top1 of R / A keeps the val order, so analysing it instead of
# subset_top1 would show no rank change at all.
_VARIANT_VALUES = {
    # model: {(dataset, split, metric): value}
    "dino_rn50": {("imagenet2012", "validation", "top1"): 70.0,
                  ("imagenet2012", "validation", "top5"): 90.0,
                  ("imagenet2012_real", "validation", "real_top1"): 74.0,
                  ("imagenet_r", "test", "subset_top1"): 30.0,
                  ("imagenet_r", "test", "top1"): 25.0,
                  ("imagenet_a", "test", "subset_top1"): 10.0,
                  ("imagenet_a", "test", "top1"): 8.0,
                  ("cub", "test", "top1"): 60.0},
    "simclr_rn50": {("imagenet2012", "validation", "top1"): 60.0,
                    ("imagenet2012", "validation", "top5"): 85.0,
                    ("imagenet2012_real", "validation", "real_top1"): 76.0,
                    ("imagenet_r", "test", "subset_top1"): 35.0,
                    ("imagenet_r", "test", "top1"): 20.0,
                    ("imagenet_a", "test", "subset_top1"): 5.0,
                    ("imagenet_a", "test", "top1"): 3.0,
                    ("cub", "test", "top1"): 40.0},
    "mae_vitb16": {("imagenet2012", "validation", "top1"): 50.0,
                   ("imagenet2012", "validation", "top5"): 80.0,
                   ("imagenet2012_real", "validation", "real_top1"): 65.0,
                   ("imagenet_r", "test", "subset_top1"): 40.0,
                   ("imagenet_r", "test", "top1"): 15.0,
                   ("imagenet_a", "test", "subset_top1"): 20.0,
                   ("imagenet_a", "test", "top1"): 2.0,
                   ("cub", "test", "top1"): 55.0},
}
_CANONICAL = {"imagenet2012": "imagenet", "imagenet2012_real": "imagenet_real",
              "imagenet_r": "imagenet_r", "imagenet_a": "imagenet_a", "cub": "cub"}
_PRIMARY_OF = {"imagenet": "top1", "imagenet_real": "real_top1",
               "imagenet_r": "subset_top1", "imagenet_a": "subset_top1", "cub": "top1"}


def _variant_rows():
  return [{"model": m, "dataset": d, "split": s, "protocol": "linear", "hparams": {},
           "metric": metric, "value": v, "n_examples": 100 + 10 * i}
          for m, vals in _VARIANT_VALUES.items()
          for i, ((d, s, metric), v) in enumerate(vals.items())]


def _ranks_desc(values):
  """1 = largest; ties get their average rank (plain Python)."""
  out = []
  for v in values:
    above = sum(1 for u in values if u > v)
    equal = sum(1 for u in values if u == v)
    out.append(above + (equal + 1) / 2)
  return out


def _expected_rank_changes(metric_of):
  """{(model, variant): (value_imagenet, value_variant, rank_in, rank_var, change)}."""
  models = list(_VARIANT_VALUES)
  value = {(m, _CANONICAL[d], metric): v for m, vals in _VARIANT_VALUES.items()
           for (d, _, metric), v in vals.items()}
  out = {}
  for variant in ("imagenet_real", "imagenet_r", "imagenet_a"):
    if any((m, variant, metric_of[variant]) not in value for m in models):
      continue
    x = [value[(m, "imagenet", "top1")] for m in models]
    y = [value[(m, variant, metric_of[variant])] for m in models]
    rx, ry = _ranks_desc(x), _ranks_desc(y)
    for i, m in enumerate(models):
      out[(m, variant)] = (x[i], y[i], rx[i], ry[i], ry[i] - rx[i])
  return out


def _rank_change_csv(path):
  return {(r["model"], r["variant"]): (float(r["value_imagenet"]), float(r["value_variant"]),
                                       float(r["rank_imagenet"]), float(r["rank_variant"]),
                                       float(r["rank_change"]))
          for r in _read(path) if r["protocol"] == "linear"}


def _outputs(out_dir):
  """Every CSV and report.md of an output directory, as text."""
  return {n: (out_dir / n).read_text() for n in sorted(os.listdir(out_dir))
          if n.endswith((".csv", ".md"))}


def test_primary_metric_uses_real_and_subset_top1(tmp_path):
  jsonl = str(tmp_path / "results.jsonl")
  store.append_results(jsonl, _variant_rows())
  csv_export = str(tmp_path / "results.csv")
  store.export_csv(jsonl, csv_export)
  primary_export = str(tmp_path / "results_primary.csv")
  store.export_primary_csv(jsonl, primary_export)
  assert table_lib.PRIMARY == store.PRIMARY
  expected = _expected_rank_changes(_PRIMARY_OF)
  # By hand: val ranks 1, 2, 3; ReaL 2, 1, 3; R 3, 2, 1; A 2, 3, 1.
  assert {k: v[4] for k, v in expected.items()} == {
      ("dino_rn50", "imagenet_real"): 1.0, ("simclr_rn50", "imagenet_real"): -1.0,
      ("mae_vitb16", "imagenet_real"): 0.0, ("dino_rn50", "imagenet_r"): 2.0,
      ("simclr_rn50", "imagenet_r"): 0.0, ("mae_vitb16", "imagenet_r"): -2.0,
      ("dino_rn50", "imagenet_a"): 1.0, ("simclr_rn50", "imagenet_a"): 1.0,
      ("mae_vitb16", "imagenet_a"): -2.0}

  # The CLI, metric left to its default: primary, since ReaL / R / A rows exist.
  out = tmp_path / "auto"
  proc = _cli("analyze", f"--results={jsonl}", f"--out={out}", "--n_boot=20",
              "--n_perm=20")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert _rank_change_csv(out / "rank_changes.csv") == expected
  agg = {r["model"]: r for r in _read(out / "aggregates.csv") if r["suite"] == "benchmark"}
  for m, vals in _VARIANT_VALUES.items():  # over ImageNet val top1 and CUB only
    v = [vals[("imagenet2012", "validation", "top1")], vals[("cub", "test", "top1")]]
    assert float(agg[m]["mean"]) == pytest.approx(sum(v) / 2, abs=1e-12)
    assert int(agg[m]["n_datasets"]) == 2
  # The lottery suite: val top1, ReaL real_top1, R and A subset_top1.
  lottery = {r["model"]: r for r in _read(out / "aggregates.csv")
             if r["suite"] == "imagenet_variants"}
  for m, vals in _VARIANT_VALUES.items():
    v = [vals[k] for k in (("imagenet2012", "validation", "top1"),
                           ("imagenet2012_real", "validation", "real_top1"),
                           ("imagenet_r", "test", "subset_top1"),
                           ("imagenet_a", "test", "subset_top1"))]
    assert float(lottery[m]["mean"]) == pytest.approx(np.mean(v), abs=1e-12)
    assert float(lottery[m]["geometric_mean"]) == pytest.approx(sps.gmean(v), abs=1e-12)
    assert int(lottery[m]["n_datasets"]) == 4
  md = (out / "report.md").read_text()
  assert "metric: `primary` (percent). Primary = each test set's main metric" in md
  assert "| model | ImageNet rank | Δ ImageNet ReaL | Δ ImageNet-R | Δ ImageNet-A |" in md
  assert "| simclr_rn50 | 2.00 | -1.00 | 0.00 | 1.00 |" in md

  # The same outputs from --metric primary on the store, its CSV export and
  # its primary export (in process; metric None is the CLI default).
  auto = _outputs(out)
  for name, path, metric in (("jsonl", jsonl, "primary"), ("csv", csv_export, "primary"),
                             ("csv_auto", csv_export, None),
                             ("primary_csv", primary_export, "primary"),
                             ("primary_csv_auto", primary_export, None)):
    d = tmp_path / name
    _command_common.write_all(path, str(d), metric=metric, n_boot=20, n_perm=20,
                              html_too=False)
    got = _outputs(d)
    assert got.keys() == auto.keys(), name
    for f in got:  # report.md names its source file
      assert got[f] == (auto[f].replace(jsonl, os.path.abspath(path))
                        if f == "report.md" else auto[f]), (name, f)

  # An explicit --metric top1 keeps the old behaviour: no ReaL, R / A unrestricted.
  top1 = tmp_path / "top1"
  _command_common.write_all(jsonl, str(top1), metric="top1", n_boot=20, n_perm=20,
                            html_too=False)
  assert _rank_change_csv(top1 / "rank_changes.csv") == _expected_rank_changes(
      {"imagenet_real": "top1", "imagenet_r": "top1", "imagenet_a": "top1"})
  assert "metric: `top1` (percent)." in (top1 / "report.md").read_text()


def test_primary_selection_per_measurement():
  # R has subset_top1 only under one hparams setting: the other setting's
  # measurement keeps its top1 (primary is chosen per measurement).
  rows = [{"model": "dino_rn50", "dataset": "imagenet_r", "split": "test",
           "protocol": "knn", "hparams": h, "metric": m, "value": v, "n_examples": 10}
          for h, m, v in (('{"k": 20}', "subset_top1", 40.0), ('{"k": 20}', "top1", 30.0),
                          ('{"k":20}', "top5", 50.0), ('{"k": 10}', "top1", 20.0))]
  t = table_lib.table_from_rows(rows, "primary")
  assert t.metric == "primary"
  assert t.values == {("dino_rn50", "knn", "imagenet_r"): (40.0 + 20.0) / 2}
  assert table_lib.table_from_rows(rows, None).metric == "primary"
  assert table_lib.table_from_rows([r for r in rows if r["metric"] != "subset_top1"],
                                   None).metric == "top1"
  with pytest.raises(ValueError, match=r"no rows with a primary metric .*\['top5'\]"):
    table_lib.table_from_rows([rows[2]], "primary")


def test_top1_only_results_unchanged_by_default(tmp_path):
  rows = synthetic.synthetic_rows(MODELS[:5], {"imagenet": 50000, "cub": 5794}, seed=5,
                                  protocols=(("linear", {}),))
  results = str(tmp_path / "results.csv")
  synthetic.write_csv(results, rows)
  outs = {}
  for name, metric in (("default", None), ("top1", "top1")):
    _command_common.write_all(results, str(tmp_path / name), metric=metric, n_boot=20,
                              n_perm=20, html_too=False)
    outs[name] = _outputs(tmp_path / name)
  assert outs["default"] == outs["top1"]
  assert "metric: `top1` (percent).\n" in outs["default"]["report.md"]
  assert len(_read(tmp_path / "default" / "rank_changes.csv")) == 5 * 7  # 7 variants
