"""`sslbench-jax probe`: flags (dashed and underscored), rows in the store."""

import json
import os
import subprocess
import sys

from absl import flags
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from sslbench_jax.features import io
from sslbench_jax.probes import command
from sslbench_jax.results import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("probe")
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  meta = {"arch": "pixels", "weights_sha256": "f" * 64, "dataset": "digits"}
  tr, te = str(d / "train.npz"), str(d / "test.npz")
  io.save(tr, io.FeatureSet(x[:1000], y[:1000], np.arange(1000).astype(str),
                            dict(meta, split="train")))
  io.save(te, io.FeatureSet(x[1000:], y[1000:], np.arange(797).astype(str),
                            dict(meta, split="test")))
  return tr, te, x, y, d


def _run(argv, capsys):
  command.define_flags()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["probe"] + argv)
  command.main(["probe"])
  return capsys.readouterr().out


def test_knn_rows_match_sklearn(files, capsys):
  tr, te, x, y, d = files
  out_path = str(d / "knn.jsonl")
  out = _run(["--features-train", tr, "--features_test", te, "--protocol", "knn",
              "--knn-metric", "euclidean", "--knn_k", "5,20", "--results", out_path],
             capsys)
  assert "appended 4 rows" in out
  rows = store.read_results(out_path)
  assert len(rows) == 4
  for r in rows:
    hp = json.loads(r["hparams"])
    assert r["protocol"] == "knn" and r["model"] == "pixels"
    assert r["dataset"] == "digits" and r["split"] == "test" and r["n_examples"] == 797
    assert r["checkpoint_sha256"] == "f" * 64
    if r["metric"] == "top1":
      clf = KNeighborsClassifier(hp["k"], weights="distance").fit(x[:1000], y[:1000])
      assert r["value"] == pytest.approx(100 * clf.score(x[1000:], y[1000:]))


@pytest.mark.parametrize("protocol,extra", [
    ("linear", ["--epochs", "3", "--batch-size", "128", "--warmup-epochs", "1",
                "--lr", "0.1,1", "--batchnorm", "false"]),
    ("logreg", ["--c", "0.01,1", "--max-iter", "100"]),
    ("leastsquares", ["--l2", "1,64"]),
    ("fewshot", ["--setups", "1shot,5%", "--tries", "2", "--fewshot-probes",
                 "knn,leastsquares"]),
])
def test_other_protocols_write_rows(files, capsys, protocol, extra):
  tr, te, _, _, d = files
  out_path = str(d / f"{protocol}.jsonl")
  _run(["--features-train", tr, "--features-test", te, "--protocol", protocol,
        "--results", out_path] + extra, capsys)
  rows = store.read_results(out_path)
  metrics = sorted(set(rows["metric"]))
  if protocol == "fewshot":
    assert metrics == ["top1_mean", "top1_std"] and len(rows) == 2 * 2 * 2
    assert set(rows["protocol"]) == {"fewshot_knn", "fewshot_leastsquares"}
  else:
    assert metrics == ["top1", "top5"] and set(rows["protocol"]) == {protocol}
    hp = json.loads(rows["hparams"][0])
    assert hp["selection"] == "holdout"
  assert all(0 <= v <= 100 for v in rows["value"])
  assert min(rows["value"][rows["metric"] != "top1_std"]) > 50  # digits are easy


def test_errors_are_one_line(files, tmp_path):
  tr, te, _, _, _ = files
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for argv, msg in [
      (["--features-train", str(tmp_path / "nope.npz"), "--features-test", te],
       "no such file"),
      (["--features-train", tr, "--features-test", te, "--protocol", "svm"],
       "--protocol must be one of"),
      (["--features_train", tr, "--features-test", te, "--knn-metric", "l1"],
       "metric must be one of")]:
    r = subprocess.run([sys.executable, "-m", "sslbench_jax.cli", "probe"] + argv,
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_run_with_options_dict(files):
  tr, te, x, y, _ = files
  opts = command.default_options()
  assert opts["knn_k"] == ["10", "20", "100", "200"] and "results" not in opts
  rows = command.run(dict(features_train=tr, features_test=te, protocol="leastsquares",
                          l2=["8"], model="m", dataset="d"))
  assert [r["metric"] for r in rows] == ["top1", "top5"]
  assert rows[0]["model"] == "m" and rows[0]["hparams"]["l2"] == 8.0
  with pytest.raises(ValueError, match="unknown probe options \\['knn_kk'\\]"):
    command.run(dict(features_train=tr, features_test=te, knn_kk=["5"]))


def test_linear_with_two_feature_sources(files, capsys):
  tr, te, x, y, d = files
  paths = {}
  for rep, feats in (("raw", x), ("sq", x[:, :20] ** 2)):
    for split, sl in (("train", slice(0, 1000)), ("test", slice(1000, None))):
      p = str(d / f"{rep}_{split}.npz")
      io.save(p, io.FeatureSet(feats[sl], y[sl], np.arange(len(y))[sl].astype(str),
                               {"arch": "pixels", "representation": rep}))
      paths[rep, split] = p
  out_path = str(d / "two.jsonl")
  _run(["--features-train", f"{paths['raw', 'train']},{paths['sq', 'train']}",
        "--features-test", f"{paths['raw', 'test']},{paths['sq', 'test']}",
        "--protocol", "linear", "--epochs", "2", "--batch-size", "128",
        "--warmup-epochs", "0", "--lr", "0.5", "--results", out_path], capsys)
  rows = store.read_results(out_path)
  hp = json.loads(rows["hparams"][0])
  assert hp["grid_size"] == 4 and hp["source"] in ("raw", "sq")
  with pytest.raises(ValueError, match="only supported by --protocol linear"):
    command.run(dict(features_train=f"{tr},{tr}", features_test=f"{te},{te}"))
  with pytest.raises(ValueError, match="labels differ"):
    command.run(dict(features_train=f"{tr},{paths['raw', 'test']}",
                     features_test=f"{te},{te}", protocol="linear"))
