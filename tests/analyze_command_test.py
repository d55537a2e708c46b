"""``sslbench-jax analyze`` / ``report`` end to end through the CLI."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

from sslbench_jax.analysis import synthetic
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
  assert len(agg) == len(MODELS) * 2
  # Arithmetic mean over the 4 benchmark datasets (variants excluded).
  r = next(r for r in agg if r["model"] == "mae_vitb16" and r["protocol"] == "knn")
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
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"sslbench-jax analyze: error: results file not found: {tmp_path / 'missing.csv'}")
  assert "Traceback" not in proc.stderr
  bad = tmp_path / "bad.csv"
  bad.write_text("model,dataset,split,protocol,metric,value,n_examples\n"
                 "m,imagenet,val,linear,top5,50,10\n")
  proc = _cli("report", f"--results={bad}", f"--out={tmp_path / 'o'}")
  assert proc.returncode == 1
  assert "no rows with metric 'top1'; metrics present: ['top5']" in proc.stderr
