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

from sslbench_jax.data import label_spaces
from sslbench_jax.features import io
from sslbench_jax.probes import command
from sslbench_jax.probes import fewshot
from sslbench_jax.probes import leastsquares
from sslbench_jax.probes import logreg
from sslbench_jax.results import store
import metrics_scoring_test as pm  # feature meta as `features` writes it

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
       "--knn-metric='l1' must be one of cosine, euclidean")]:
    r = subprocess.run([sys.executable, "-m", "sslbench_jax.cli", "probe"] + argv,
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_run_with_options_dict(files):
  tr, te, x, y, _ = files
  fields = command.option_fields()
  assert fields["knn_k"].default == (10, 20, 100, 200) and "results" not in fields
  rows = command.run(dict(features_train=tr, features_test=te, protocol="leastsquares",
                          l2=["8"], model="m", dataset="d"))
  assert [r["metric"] for r in rows] == ["top1", "top5"]
  assert rows[0]["model"] == "m" and rows[0]["hparams"]["l2"] == 8.0
  with pytest.raises(ValueError, match="unknown probe options \\['knn_kk'\\]"):
    command.run(dict(features_train=tr, features_test=te, knn_kk=["5"]))


def test_options_the_protocol_ignores_are_logged(files, caplog):
  tr, te, *_ = files
  with caplog.at_level("WARNING", logger="absl"):
    command.run(dict(features_train=tr, features_test=te, protocol="leastsquares",
                     l2=["8"], epochs=5, zscore=True))
  assert "--protocol leastsquares does not use --epochs=5, --zscore=True" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="absl"):
    command.run(dict(features_train=tr, features_test=te, protocol="leastsquares",
                     l2=["8"], holdout=0.2))
  assert "does not use" not in caplog.text


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


# ------------------------------------------- test sets with their own metrics


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
  """Train: 1000-class (ImageNet-1k) features of 10 classes; tests shaped like
  `features` output for ImageNet-R (labels: 1000-class indices of R classes,
  some images pulled towards a class outside R) and ImageNet-ReaL."""
  d = tmp_path_factory.mktemp("imagenet_like")
  rng = np.random.default_rng(0)
  sub = np.asarray(label_spaces.imagenet_r_indices())
  outside = np.setdiff1d(np.arange(1000), sub)
  r_classes, other = sub[[3, 50, 120, 199, 7, 88]], outside[[0, 10, 400, 799]]
  centres = {c: rng.normal(scale=2.0, size=8) for c in np.r_[r_classes, other]}
  ytr = np.repeat(np.r_[r_classes, other], 6)
  xtr = np.stack([centres[c] for c in ytr]) + rng.normal(size=(len(ytr), 8))
  yte = rng.choice(r_classes, 30)
  decoy = rng.choice(other, 30)
  a = np.where(np.arange(30) < 12, 0.4, 1.0)[:, None]  # 12 images lean outside R
  xte = (a * np.stack([centres[c] for c in yte])
         + (1 - a) * np.stack([centres[c] for c in decoy])
         + 0.3 * rng.normal(size=(30, 8)))
  real = np.zeros((30, 1000), np.int8)
  real[np.arange(30), yte] = 1
  real[np.arange(0, 30, 3), decoy[::3]] = 1   # a second valid label
  real[[1, 2, 4]] = 0                        # empty sets: not scored
  paths = {}
  for name, dataset, split, x, y in (
      ("train", "imagenet1k", "train", xtr, ytr),
      ("r", "imagenet_r", "test", xte, yte),
      ("real", "imagenet_real", "validation", xte, real),
      ("real_train", "imagenet_real", "validation", xtr, np.eye(1000, dtype=np.int8)[ytr])):
    paths[name] = str(d / f"{name}.npz")
    io.save(paths[name], io.FeatureSet(
        x.astype(np.float32), y, np.arange(len(y)).astype(str),
        pm.feature_meta(dataset, split, len(y))))
  return paths, sub


def _load(path):
  fs = io.load(path)
  return fs.features, fs.labels


def _sklearn_knn_scores(xtr, ytr, xte):
  """Every training example votes 1/distance (sklearn), as 1000 columns."""
  clf = KNeighborsClassifier(len(ytr), weights="distance").fit(xtr, ytr)
  out = np.zeros((len(xte), 1000))
  out[:, clf.classes_] = clf.predict_proba(xte)
  return out


def _subset_top1(scores, labels, sub):
  return 100 * np.mean(sub[scores[:, sub].argmax(1)] == labels)


def _real_top1(scores, multi_hot):
  keep = multi_hot.any(1)
  pred = scores.argmax(1)
  return 100 * np.mean(multi_hot[keep, pred[keep]] == 1)


def test_logreg_on_imagenet_r_reports_subset_top1(imagenet_like):
  paths, sub = imagenet_like
  rows = command.run(dict(features_train=paths["train"], features_test=paths["r"],
                          protocol="logreg", c=["0.1", "10"], max_iter=50))
  by = {r["metric"]: r for r in rows}
  assert list(by) == ["subset_top1", "top1", "top5"]
  assert {(r["dataset"], r["split"], r["n_examples"]) for r in rows} == {
      ("imagenet_r", "test", 30)}
  xtr, ytr = _load(paths["train"])
  xte, yte = _load(paths["r"])
  (w,), (b,) = logreg.fit(xtr, ytr, 1000, [by["top1"]["hparams"]["C"]], max_iter=50)
  s = xte @ w + b  # the selected C refitted on all of train, as the probe does
  assert by["subset_top1"]["value"] == pytest.approx(_subset_top1(s, yte, sub), abs=1e-9)
  assert by["top1"]["value"] == pytest.approx(100 * np.mean(s.argmax(1) == yte),
                                              abs=1e-9)
  assert by["subset_top1"]["value"] > by["top1"]["value"] + 10


def test_knn_on_imagenet_r_and_real_match_sklearn(imagenet_like):
  paths, sub = imagenet_like
  xtr, ytr = _load(paths["train"])
  xte, yte = _load(paths["r"])
  _, real = _load(paths["real"])
  ref = _sklearn_knn_scores(xtr, ytr, xte)
  opts = dict(features_train=paths["train"], protocol="knn", knn_metric="euclidean",
              knn_k=[str(len(ytr))])
  rows = command.run(dict(opts, features_test=paths["r"]))
  by = {r["metric"]: r["value"] for r in rows}
  assert list(by) == ["subset_top1", "top1", "top5"]
  assert by["subset_top1"] == pytest.approx(_subset_top1(ref, yte, sub), abs=1e-9)
  assert by["top1"] == pytest.approx(100 * np.mean(ref.argmax(1) == yte), abs=1e-9)
  top5 = np.argsort(-ref, axis=1, kind="stable")[:, :5]
  assert by["top5"] == pytest.approx(100 * np.mean(np.any(top5 == yte[:, None], 1)),
                                     abs=1e-9)
  rows = command.run(dict(opts, features_test=paths["real"]))
  assert [r["metric"] for r in rows] == ["real_top1"]
  assert rows[0]["dataset"] == "imagenet_real" and rows[0]["n_examples"] == 27
  assert rows[0]["value"] == pytest.approx(_real_top1(ref, real), abs=1e-9)


def test_leastsquares_on_real(imagenet_like):
  """Multi-hot test labels reach the probe only through its test scores."""
  paths, _ = imagenet_like
  xtr, ytr = _load(paths["train"])
  xte, real = _load(paths["real"])
  rows = command.run(dict(features_train=paths["train"], features_test=paths["real"],
                          protocol="leastsquares", l2=["1", "64"]))
  assert [r["metric"] for r in rows] == ["real_top1"] and rows[0]["n_examples"] == 27
  s = leastsquares.predict(leastsquares.precompute(xtr, ytr, 1000), xte,
                           rows[0]["hparams"]["l2"])
  assert rows[0]["value"] == pytest.approx(_real_top1(s, real), abs=1e-9)
  with pytest.raises(ValueError, match="needs single-label"):
    command.run(dict(features_train=paths["train"], features_test=paths["real"],
                     protocol="leastsquares", l2=["1", "64"], select_on_test=True))


def test_fewshot_on_a_multi_label_test_set(files, tmp_path):
  """Few-shot reports the test space's metric (mean, std over tries)."""
  tr, _, x, y, _ = files
  rng = np.random.default_rng(0)
  multi = np.eye(10, dtype=np.int8)[y[1000:]]
  multi[rng.random(797) < 0.3, rng.integers(0, 10)] = 1
  multi[rng.random(797) < 0.1] = 0
  space = {"name": "digits_multi", "num_classes": 10, "multi_label": True,
           "subset_size": None, "metrics": ["real_top1"]}
  te = str(tmp_path / "multi.npz")
  io.save(te, io.FeatureSet(x[1000:], multi, np.arange(797).astype(str),
                            pm.feature_meta("digits_multi", "test", 797, space)))
  rows = command.run(dict(features_train=tr, features_test=te, protocol="fewshot",
                          setups=["2shot"], tries=2, fewshot_probes=["leastsquares"]))
  assert [r["metric"] for r in rows] == ["real_top1_mean", "real_top1_std"]
  vals = []
  for t in range(2):
    idx = fewshot.sample_subset(y[:1000], 10, shots=2, seed=0, trial=t)
    cache = leastsquares.precompute(x[:1000][idx], y[:1000][idx], 10)
    vals.append(_real_top1(leastsquares.predict(cache, x[1000:], 2.0 ** 10), multi))
  assert rows[0]["value"] == pytest.approx(np.mean(vals), abs=1e-9)
  assert rows[1]["value"] == pytest.approx(np.std(vals), abs=1e-9)
  assert rows[0]["n_examples"] == int(multi.any(1).sum())


def test_label_space_errors(files, imagenet_like, tmp_path):
  paths, _ = imagenet_like
  _, _, x, y, _ = files
  with pytest.raises(ValueError, match="multi-hot .* training labels"):
    command.run(dict(features_train=paths["real_train"], features_test=paths["r"]))
  te_digits = str(tmp_path / "digits8.npz")  # label space from the registry
  io.save(te_digits, io.FeatureSet(x[:5, :8], y[:5], np.arange(5).astype(str),
                                   {"dataset": "digits", "split": "test"}))
  with pytest.raises(ValueError) as e:
    command.run(dict(features_train=paths["train"], features_test=te_digits))
  msg = str(e.value)
  assert msg.startswith("label spaces differ") and paths["train"] in msg
  assert te_digits in msg and "1000 classes (imagenet1k)" in msg
  assert "10 (digits)" in msg
  # A subset space that records no subset (files written before it was
  # recorded) and names no registered dataset: nothing can score it.
  unknown = {k: v for k, v in pm.SPACES["imagenet_r"].items() if k != "subset"}
  unknown["name"] = "my_renditions"
  te = str(tmp_path / "unknown.npz")
  io.save(te, io.FeatureSet(x[:5, :8], y[:5], np.arange(5).astype(str),
                            pm.feature_meta("my_renditions", "test", 5, unknown)))
  with pytest.raises(ValueError, match="unknown label space 'my_renditions'"):
    command.run(dict(features_train=paths["train"], features_test=te))



def test_progress_flag(files, capfd):
  tr, te, _, _, _ = files
  argv = ["--features-train", tr, "--features-test", te, "--protocol", "logreg",
          "--c", "0.01,1", "--max-iter", "30"]
  outputs = []
  for extra in ([], ["--noprogress"]):  # default: bars on
    command.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["probe"] + argv + extra)
    command.main(["probe"])
    outputs.append(capfd.readouterr())
  assert "logreg C" in outputs[0].err and "logreg C" not in outputs[1].err
  assert "logreg" in outputs[0].out and outputs[0].out == outputs[1].out
