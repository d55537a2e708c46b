"""The main job (``sslbench-jax evaluate``) on the demo config in tiny mode."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from sslbench_jax import evaluate
from sslbench_jax.features import io
import multiprocess_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_config(arg="tiny=True"):
  spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  summary = evaluate.run(_demo_config(), workdir)
  return workdir, summary


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_demo_writes_results_and_report(demo_run):
  workdir, summary = demo_run
  rows = _rows(workdir)
  assert summary["new_rows"] == len(rows) > 0
  protocols = {r["protocol"] for r in rows}
  assert {"knn_dino_k10", "knn_dino_k20", "knn_euclidean", "linear", "logreg"} <= protocols
  for r in rows:
    assert r["checkpoint_sha256"] and r["model"] == "efficientnet_lite0"
    assert r["versions"] and r["device_count"] >= 1
    assert 0.0 <= r["value"] <= 100.0
  with open(summary["csv"]) as f:
    header = next(csv.reader(f))
  assert {"model", "dataset", "split", "protocol", "metric", "value", "n_examples"} <= set(header)
  assert os.path.exists(summary["report"])


def test_demo_knn_matches_sklearn_on_its_own_features(demo_run):
  workdir, _ = demo_run
  tr = io.load(os.path.join(workdir, "features",
                            "efficientnet_lite0__digits__train__pre_logits.npz"))
  te = io.load(os.path.join(workdir, "features",
                            "efficientnet_lite0__digits__test__pre_logits.npz"))
  ref = KNeighborsClassifier(n_neighbors=20, weights="distance").fit(tr.features, tr.labels)
  expected = 100.0 * np.mean(ref.predict(te.features) == te.labels)
  got = [r["value"] for r in _rows(workdir)
         if r["protocol"] == "knn_euclidean" and r["metric"] == "top1"]
  assert got == [pytest.approx(expected, abs=1e-9)]
  assert tr.meta["arch"] == "efficientnet_lite0" and len(te.labels) == 360


def test_rerun_skips_finished_steps(demo_run):
  workdir, _ = demo_run
  before = _rows(workdir)
  summary = evaluate.run(_demo_config(), workdir)
  assert summary["new_rows"] == 0
  assert _rows(workdir) == before


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.__setitem__("colour", 1), "colour"),
    (lambda c: c.models.efficientnet_lite0.__setitem__("weights", "x"), "weights"),
    (lambda c: c.protocols.knn_dino.__setitem__("kk", 3), "kk"),
    (lambda c: c.protocols.knn_dino.__setitem__("datasets", ["nope"]), "nope"),
    (lambda c: c.models.efficientnet_lite0.__setitem__("arch", "resnet7"), "resnet7"),
])
def test_config_errors_name_the_key(mutate, message, tmp_path):
  config = _demo_config()
  with config.unlocked():
    mutate(config)
  with pytest.raises(ValueError, match=message):
    evaluate.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # validated before any work


def test_cli_rejects_override_of_unknown_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "sslbench_jax.cli", "evaluate",
       "--config", os.path.join(ROOT, "configs", "demo.py") + ":tiny=True",
       "--workdir", str(tmp_path), "--config.sed=3"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode != 0
  assert "sed" in proc.stderr
  assert not os.listdir(tmp_path)


def _load_config(name, arg):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_closer_look_config_is_valid_and_complete():
  config = _load_config("closer_look", "checkpoints=/ckpt")
  evaluate.validate(config)
  archs = [m.arch for m in config.models.values()]
  assert archs.count("resnet50") == 17 and archs.count("vit_base_patch16") == 9
  assert len(config.datasets) == 11
  assert config.datasets.cub.preprocessing == "pad_square"
  assert config.datasets.pascal.preprocessing == "crop_square"
  small = _load_config("closer_look", "checkpoints=/c,models=swav+mae,datasets=cub")
  assert sorted(small.models) == ["mae", "swav"] and list(small.datasets) == ["cub"]
  with pytest.raises(ValueError, match="checkpoints"):
    _load_config("closer_look", None)
  with pytest.raises(ValueError, match="unknown models"):
    _load_config("closer_look", "checkpoints=/c,models=swav+nope")


def test_two_processes_give_the_single_process_results(demo_run, tmp_path):
  """The same command on 2 'hosts' x 2 devices (jax.distributed over gloo)."""
  workdir, _ = demo_run
  mp_dir = str(tmp_path / "mp")
  port = multiprocess_util.free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "sslbench_jax.cli", "evaluate",
         "--config", os.path.join(ROOT, "configs", "demo.py") + ":tiny=True",
         "--workdir", mp_dir], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  single = {(r["protocol"], r["metric"]): r["value"] for r in _rows(workdir)}
  multi = _rows(mp_dir)
  assert {(r["protocol"], r["metric"]): r["value"] for r in multi} == single
  assert {r["device_count"] for r in multi} == {4}
