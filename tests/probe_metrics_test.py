"""Probe test metrics (probes/_test_metrics.py) vs NumPy, on files shaped like
what `sslbench-jax features --dataset ...` writes for ImageNet ReaL / R / A."""

import numpy as np
import pytest

from sslbench_jax.data import label_spaces
from sslbench_jax.data import registry
from sslbench_jax.features import io
from sslbench_jax.probes import _test_metrics
from sslbench_jax.probes import knn

# The label spaces `features` records (meta["source"]["label_space"]), written
# out by hand so that a drift in the registry shows up below.
SPACES = {
    "imagenet1k": {"name": "imagenet1k", "num_classes": 1000, "multi_label": False,
                   "subset_size": None, "metrics": ["top1"]},
    "imagenet_real": {"name": "imagenet_real", "num_classes": 1000,
                      "multi_label": True, "subset_size": None,
                      "metrics": ["real_top1"]},
    "imagenet_r": {"name": "imagenet_r", "num_classes": 1000, "multi_label": False,
                   "subset_size": 200, "metrics": ["subset_top1", "top1"]},
    "imagenet_a": {"name": "imagenet_a", "num_classes": 1000, "multi_label": False,
                   "subset_size": 200, "metrics": ["subset_top1", "top1"]},
}
SUBSETS = {"imagenet_r": label_spaces.imagenet_r_indices,
           "imagenet_a": label_spaces.imagenet_a_indices}


def feature_meta(dataset, split, n, space=None):
  """A FeatureSet meta as `features --dataset DATASET --split SPLIT` writes it."""
  space = SPACES[dataset] if space is None else space
  return {
      "arch": "resnet50", "arch_options": {}, "weights_sha256": "ab" * 32,
      "dataset": dataset, "split": split, "preprocessing": "imagenet_bilinear",
      "cache_key": "0" * 64, "data_dir": "/data", "images": None,
      "source": {"dataset": dataset, "split": split, "num_examples": n,
                 "label_space": space, "preprocessing": "imagenet_bilinear"},
      "representation": "pre_logits", "dtype": "float32", "device_count": 1,
      "process_count": 1, "versions": {}, "num_examples": n, "num_skipped": 0}


def feature_set(labels, dataset, split="test", dim=4, seed=0, space=None):
  n = len(labels)
  x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
  return io.FeatureSet(x, np.asarray(labels), np.array([f"img{i}" for i in range(n)]),
                       feature_meta(dataset, split, n, space))


def _np_topk(scores, labels, k):
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return 100 * np.mean(np.any(order == labels[:, None], axis=1))


def _scores_with_hits(labels, decoys, rng, num_classes=1000):
  """Random scores where labels win often, and decoy classes sometimes beat them."""
  s = rng.normal(size=(len(labels), num_classes)).astype(np.float32)
  s[np.arange(len(labels)), labels] += rng.choice([0.0, 4.0], len(labels))
  rows = rng.random(len(labels)) < 0.4
  s[rows, rng.choice(decoys, rows.sum())] += 8.0
  return s


@pytest.mark.parametrize("dataset", sorted(SPACES))
def test_recorded_spaces_are_the_registrys(dataset):
  assert registry.get_spec(dataset).info()["label_space"] == SPACES[dataset]


def test_real_top1_over_non_empty_rows():
  rng = np.random.default_rng(0)
  n = 40
  y = np.zeros((n, 1000), np.int8)
  for i in range(n):
    y[i, rng.choice(1000, rng.integers(0, 4), replace=False)] = 1  # 0 = empty set
  assert 0 < (~y.any(1)).sum() < n
  first = np.array([np.flatnonzero(r)[0] if r.any() else 0 for r in y])
  s = _scores_with_hits(first, np.arange(1000), rng)
  fs = feature_set(y, "imagenet_real", "validation")
  got = _test_metrics.evaluate(s, fs, "real.npz")
  keep = y.any(1)
  pred = s.argmax(1)
  ref = 100 * np.mean([y[i, pred[i]] == 1 for i in np.flatnonzero(keep)])
  assert list(got) == ["real_top1"]  # no single-label top-1/top-5 for ReaL
  assert got["real_top1"] == pytest.approx(ref, abs=1e-9)
  assert 0 < ref < 100


@pytest.mark.parametrize("dataset", ["imagenet_r", "imagenet_a"])
@pytest.mark.parametrize("stored", ["full", "positions"])
def test_subset_top1_restricts_scores(dataset, stored):
  rng = np.random.default_rng(1)
  sub = np.asarray(SUBSETS[dataset]())
  outside = np.setdiff1d(np.arange(1000), sub)
  pos = rng.integers(0, 200, 60)
  y_full = sub[pos]
  s = _scores_with_hits(y_full, outside, rng)
  # the registry stores 1000-class indices; an ImageFolder over the 200 wnid
  # folders (labelled elsewhere) would give positions 0..199
  fs = feature_set(y_full if stored == "full" else pos, dataset)
  got = _test_metrics.evaluate(s, fs, f"{dataset}.npz")
  restricted = sub[s[:, sub].argmax(1)]
  ref_sub = 100 * np.mean(restricted == y_full)
  ref_top1 = 100 * np.mean(s.argmax(1) == y_full)
  assert list(got) == ["subset_top1", "top1", "top5"]
  assert got["subset_top1"] == pytest.approx(ref_sub, abs=1e-9)
  assert got["top1"] == pytest.approx(ref_top1, abs=1e-9)
  assert got["top5"] == pytest.approx(_np_topk(s, y_full, 5), abs=1e-9)
  assert ref_sub > ref_top1 + 10  # the decoys outside the subset are ignored


def test_mean_per_class_and_padding(monkeypatch):
  """A label space listing mean_per_class; chunks that do not divide N."""
  monkeypatch.setattr(_test_metrics, "_CHUNK", 16)
  rng = np.random.default_rng(2)
  space = {"name": "toy", "num_classes": 7, "multi_label": False,
           "subset_size": None, "metrics": ["mean_per_class", "top1"]}
  y = rng.choice([0, 1, 1, 1, 3, 5, 5, 6], 45)  # classes 2 and 4 absent
  s = _scores_with_hits(y, np.arange(7), rng, 7)
  got = _test_metrics.evaluate(s, feature_set(y, "toy", space=space), "toy.npz")
  pred = s.argmax(1)
  per_class = [np.mean(pred[y == c] == c) for c in np.unique(y)]
  assert list(got) == ["mean_per_class", "top1", "top5"]
  assert got["mean_per_class"] == pytest.approx(100 * np.mean(per_class), abs=1e-9)
  assert got["top1"] == pytest.approx(100 * np.mean(pred == y), abs=1e-9)
  assert got["top5"] == pytest.approx(_np_topk(s, y, 5), abs=1e-9)


def test_plain_file_and_float64_scores():
  """No meta["source"]: the registry entry of meta["dataset"], else top-1/5."""
  rng = np.random.default_rng(3)
  y = rng.integers(0, 10, 30)
  s = rng.normal(size=(30, 10))  # float64, as least squares returns them
  # Labels that beat the best other class by less than float32 resolves: a
  # float32 ranking would see ties (lower index wins), float64 does not.
  close = rng.random(30) < 0.6
  s[close, y[close]] = s[close].max(1) + 1e-12
  assert np.sum(close & (s.argmax(1) == y) & (s.astype(np.float32).argmax(1) != y)) > 3
  for meta in ({"dataset": "digits"}, {"arch": "pixels"}):
    fs = io.FeatureSet(np.zeros((30, 2), np.float32), y, np.arange(30).astype(str),
                       meta)
    got = _test_metrics.evaluate(s, fs)
    assert list(got) == ["top1", "top5"]
    assert got["top1"] == pytest.approx(100 * np.mean(s.argmax(1) == y), abs=1e-9)
    assert got["top5"] == pytest.approx(_np_topk(s, y, 5), abs=1e-9)


def test_knn_top5_never_counts_unvoted_classes():
  y = np.array([0, 0, 7, 3])
  s = np.zeros((4, 10), np.float32)
  s[0, [4, 6]] = [2.0, 1.0]      # label 0 unvoted: plain ranking puts it 3rd
  s[1, [0, 4]] = [0.5, 1.0]      # label 0 voted, 2nd
  s[2, [1, 2, 3, 4, 5, 7]] = [6, 5, 4, 3, 2, 1]  # voted but 6th
  s[3, 3] = 1.0
  fs = io.FeatureSet(np.zeros((4, 2), np.float32), y, np.arange(4).astype(str), {})
  plain = _test_metrics.evaluate(s, fs)
  ours = _test_metrics.evaluate(s, fs, topk_correct=knn.topk_correct)
  assert plain["top5"] == pytest.approx(75.0) and ours["top5"] == pytest.approx(50.0)
  assert ours["top1"] == plain["top1"] == pytest.approx(25.0)


def test_errors():
  y = np.arange(5)
  with pytest.raises(ValueError, match="unknown metric"):
    bad = dict(SPACES["imagenet1k"], metrics=["top3"])
    _test_metrics.resolve(feature_set(y, "imagenet1k", space=bad), "x.npz")
  with pytest.raises(ValueError, match="unknown label space 'my_subset'"):
    sub = dict(SPACES["imagenet_r"], name="my_subset")
    _test_metrics.resolve(feature_set(y, "my_subset", space=sub), "x.npz")
  with pytest.raises(ValueError, match="neither classes of 'imagenet_r'"):
    _test_metrics.resolve(feature_set(np.array([0, 999]), "imagenet_r"), "x.npz")
  with pytest.raises(ValueError, match="no label space"):
    fs = io.FeatureSet(np.zeros((2, 2), np.float32), np.eye(2, dtype=np.int8),
                       np.array(["a", "b"]), {})
    _test_metrics.resolve(fs, "x.npz")
  with pytest.raises(ValueError, match="do not fit label space 'imagenet1k'"):
    _test_metrics.resolve(feature_set(np.zeros((2, 1000), np.int8), "imagenet1k"),
                          "x.npz")
  with pytest.raises(ValueError, match="x.npz: label space 'imagenet1k' has 1000 "
                     "classes but the probe scores 10"):
    _test_metrics.evaluate(np.zeros((5, 10)), feature_set(y, "imagenet1k"), "x.npz")
  with pytest.raises(ValueError, match="unknown label -1"):
    _test_metrics.resolve(feature_set(np.array([1, -1]), "imagenet1k"), "x.npz")
