"""The probe CLI's rows are pinned: the same keys, values and order as before
the protocol table (tests/fixtures/probe_rows_golden.json, written by the code
before the redesign with ``SSLBENCH_WRITE_GOLDEN=1``).

Fixed feature files (seeded blobs, and ImageNet-like ReaL / R test sets) run
through every protocol, with warnings (k above the training set size, unseen
test classes), two feature sources, a multi-label test set and "max over test".
"""

import json
import os

from absl import flags
import numpy as np
import pytest

from sslbench_jax.features import io
from sslbench_jax.probes import command

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "probe_rows_golden.json")
# Label spaces as `features` recorded them when the rows were pinned.
SPACES = {
    "imagenet1k": {"name": "imagenet1k", "num_classes": 1000, "multi_label": False,
                   "subset_size": None, "metrics": ["top1"]},
    "imagenet_real": {"name": "imagenet_real", "num_classes": 1000,
                      "multi_label": True, "subset_size": None,
                      "metrics": ["real_top1"]},
    "imagenet_r": {"name": "imagenet_r", "num_classes": 1000, "multi_label": False,
                   "subset_size": 200, "metrics": ["subset_top1", "top1"]},
}


def _feature_meta(dataset, split, n):
  """A FeatureSet meta as `features --dataset DATASET --split SPLIT` wrote it."""
  return {
      "arch": "resnet50", "arch_options": {}, "weights_sha256": "ab" * 32,
      "dataset": dataset, "split": split, "preprocessing": "imagenet_bilinear",
      "cache_key": "0" * 64, "data_dir": "/data", "images": None,
      "source": {"dataset": dataset, "split": split, "num_examples": n,
                 "label_space": SPACES[dataset], "preprocessing": "imagenet_bilinear"},
      "representation": "pre_logits", "dtype": "float32", "device_count": 1,
      "process_count": 1, "versions": {}, "num_examples": n, "num_skipped": 0}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  d = tmp_path_factory.mktemp("golden")
  rng = np.random.default_rng(7)
  centres = rng.normal(scale=1.5, size=(6, 12))
  ytr, yte = np.repeat(np.arange(6), 20), np.repeat(np.arange(6), 7)
  xtr = (centres[ytr] + rng.normal(size=(120, 12))).astype(np.float32)
  xte = (centres[yte] + rng.normal(size=(42, 12))).astype(np.float32)
  meta = {"arch": "blobs", "weights_sha256": "a" * 64, "dataset": "blobs",
          "preprocessing": "none", "dtype": "float32"}
  out = {}
  for name, x, y, extra in (
      ("train", xtr, ytr, dict(split="train", representation="cls")),
      ("test", xte, yte, dict(split="test", representation="cls",
                              preprocessing="other")),
      ("train2", xtr[:, ::-1] * 2, ytr, dict(split="train", representation="avg")),
      ("test2", xte[:, ::-1] * 2, yte, dict(split="test", representation="avg")),
      ("train3", xtr[ytr < 5], ytr[ytr < 5], dict(split="train", num_classes=6))):
    out[name] = str(d / f"{name}.npz")
    io.save(out[name], io.FeatureSet(np.ascontiguousarray(x), y,
                                     np.arange(len(y)).astype(str),
                                     dict(meta, **extra)))
  # ReaL-shaped multi-hot test labels (an ImageNet-1k label space).
  rng = np.random.default_rng(1)
  ytr_in, yte_in = np.repeat([3, 50, 120, 199], 8), rng.choice([3, 50, 120, 199], 16)
  cen = {c: rng.normal(scale=2.0, size=6) for c in (3, 50, 120, 199)}
  xtr_in = np.stack([cen[c] for c in ytr_in]) + rng.normal(size=(32, 6))
  xte_in = np.stack([cen[c] for c in yte_in]) + rng.normal(size=(16, 6))
  real = np.zeros((16, 1000), np.int8)
  real[np.arange(16), yte_in] = 1
  real[[2, 5]] = 0
  for name, dataset, split, x, y in (
      ("in_train", "imagenet1k", "train", xtr_in, ytr_in),
      ("in_real", "imagenet_real", "validation", xte_in, real),
      ("in_r", "imagenet_r", "test", xte_in, yte_in)):
    out[name] = str(d / f"{name}.npz")
    io.save(out[name], io.FeatureSet(x.astype(np.float32), y,
                                     np.arange(len(y)).astype(str),
                                     _feature_meta(dataset, split, len(y))))
  return out


# (case name, the probe's options; files by their fixture name)
CASES = (
    ("knn_default", dict(features_train="train", features_test="test")),
    ("knn_euclidean_zscore", dict(features_train="train", features_test="test",
                                  knn_k=["5", "20"], knn_metric="euclidean",
                                  zscore=True)),
    ("knn_unseen_classes", dict(features_train="train3", features_test="test",
                                knn_k=["3"], model="m", dataset="d", seed=3)),
    ("linear", dict(features_train="train", features_test="test", protocol="linear",
                    epochs=3, batch_size=32, warmup_epochs=1,
                    weight_decay=["0", "0.001"])),
    ("linear_two_sources", dict(features_train="train,train2",
                                features_test="test,test2", protocol="linear",
                                epochs=2, batch_size=64, lr=["0.1"],
                                batchnorm=["true"], optimizer=["sgd", "adamw"],
                                clip_norm=0.0)),
    ("linear_select_on_test", dict(features_train="train", features_test="test",
                                   protocol="linear", epochs=2, batch_size=64,
                                   select_on_test=True, holdout=0.2)),
    ("logreg", dict(features_train="train", features_test="test", protocol="logreg",
                    c=["0.01", "1", "100"], max_iter=50)),
    ("leastsquares", dict(features_train="train", features_test="test",
                          protocol="leastsquares")),
    ("leastsquares_real", dict(features_train="in_train", features_test="in_real",
                               protocol="leastsquares", l2=["1", "100"])),
    ("logreg_r", dict(features_train="in_train", features_test="in_r",
                      protocol="logreg", c=["1"], max_iter=30)),
    ("knn_real", dict(features_train="in_train", features_test="in_real",
                      knn_k=["4", "40"])),
    ("fewshot", dict(features_train="train", features_test="test", protocol="fewshot",
                     setups=["1shot", "5shot", "10%"], tries=2, fewshot_k=8)),
    ("fewshot_euclidean", dict(features_train="train", features_test="test",
                          protocol="fewshot", setups=["2shot"], tries=2,
                          fewshot_probes=["knn", "leastsquares"],
                          knn_metric="euclidean")),
)


def _rows(paths, opts):
  opts = dict(opts, progress=False)
  for key in ("features_train", "features_test"):
    opts[key] = ",".join(paths[n] for n in opts[key].split(","))
  rows = command.run(opts)
  # device_count depends on the test process's devices, not on the code.
  return [{k: v for k, v in r.items() if k != "device_count"} for r in rows]


def test_probe_rows_equal_the_pinned_ones(paths):
  got = {name: _rows(paths, opts) for name, opts in CASES}
  # JSON round trip: the store's own representation of a row.
  got = json.loads(json.dumps(got))
  if os.environ.get("SSLBENCH_WRITE_GOLDEN"):
    with open(GOLDEN, "w") as f:
      json.dump(got, f, indent=1)
  with open(GOLDEN) as f:
    want = json.load(f)
  assert list(got) == list(want)
  for name in want:
    # Byte-identical: same keys in the same order, same values.
    assert json.dumps(got[name]) == json.dumps(want[name]), name
