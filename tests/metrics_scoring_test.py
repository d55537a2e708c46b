"""metrics.scoring vs independent references, on feature files shaped like
what `sslbench-jax features --dataset ...` writes (ImageNet ReaL / R / A, ...).

References: NumPy stable argsort (ties to the lower class index), scikit-learn's
top_k_accuracy_score, the ReaL paper's rule (Beyer et al. 2020: an image counts
when the top-1 prediction is in its label set; images with an empty set are not
scored), Hendrycks et al.'s ImageNet-R/-A rule (argmax over the 200 classes).
"""

import json

import jax
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from sslbench_jax.data import label_spaces
from sslbench_jax.data import registry
from sslbench_jax.features import io
from sslbench_jax.metrics import accuracy
from sslbench_jax.metrics import label_space as label_space_lib
from sslbench_jax.metrics import primary
from sslbench_jax.metrics import scoring


def _shipped_indices(name):
  """The shipped subset file, read here rather than through label_spaces."""
  import importlib.resources  # pylint: disable=g-import-not-at-top
  text = importlib.resources.files("sslbench_jax.data").joinpath(
      "meta", f"{name}_indices.txt").read_text()
  return [int(x) for x in text.split()]


# The label spaces extraction records (meta["source"]["label_space"]), written
# out by hand so that a drift in the registry shows up below.
SPACES = {
    "imagenet1k": {"name": "imagenet1k", "num_classes": 1000, "multi_label": False,
                   "subset_size": None, "metrics": ["top1"]},
    "imagenet_real": {"name": "imagenet_real", "num_classes": 1000,
                      "multi_label": True, "subset_size": None,
                      "metrics": ["real_top1"]},
    "imagenet_r": {"name": "imagenet_r", "num_classes": 1000, "multi_label": False,
                   "subset_size": 200, "metrics": ["subset_top1", "top1"],
                   "subset": _shipped_indices("imagenet_r")},
    "imagenet_a": {"name": "imagenet_a", "num_classes": 1000, "multi_label": False,
                   "subset_size": 200, "metrics": ["subset_top1", "top1"],
                   "subset": _shipped_indices("imagenet_a")},
}


def _legacy(space):
  """The same space as files written before the subset was recorded."""
  return {k: v for k, v in space.items() if k != "subset"}


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


def score(s, fs, path="test.npz", **kwargs):
  return scoring.evaluate(s, scoring.resolve(fs.labels, fs.meta, path), **kwargs)


def _np_topk_hits(scores, labels, k):
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.any(order == labels[:, None], axis=1)


def _np_topk(scores, labels, k):
  return 100 * np.mean(_np_topk_hits(scores, labels, k))


def _scores_with_hits(labels, decoys, rng, num_classes=1000):
  """Random scores where labels win often, and decoy classes sometimes beat them."""
  s = rng.normal(size=(len(labels), num_classes)).astype(np.float32)
  s[np.arange(len(labels)), labels] += rng.choice([0.0, 4.0], len(labels))
  rows = rng.random(len(labels)) < 0.4
  s[rows, rng.choice(decoys, rows.sum())] += 8.0
  return s


@pytest.fixture
def no_registry(monkeypatch):
  """Fails any fallback to the dataset registry (files must describe themselves)."""
  def fail(*args, **kwargs):
    raise AssertionError("scoring looked the label space up in the registry")
  monkeypatch.setattr(label_space_lib, "legacy_label_space", fail)
  monkeypatch.setattr(registry, "get_spec", fail)


# ------------------------------------------------------------ label spaces


@pytest.mark.parametrize("dataset", sorted(SPACES))
def test_recorded_spaces_are_the_registrys(dataset):
  info = registry.get_spec(dataset).info()["label_space"]
  assert info == SPACES[dataset]
  json.dumps(info)


@pytest.mark.parametrize("dataset", sorted(SPACES))
def test_label_space_round_trip_through_a_feature_file(tmp_path, dataset, no_registry):
  """What extraction records is read back from the file alone."""
  spec_space = registry._REGISTRY[dataset].label_space(None)  # pylint: disable=protected-access
  meta = feature_meta(dataset, "test", 3, space=spec_space.to_json())
  y = np.zeros((3, 1000), np.int8) if spec_space.multi_label else np.array(
      [spec_space.subset[0] if spec_space.subset else 0] * 3)
  path = str(tmp_path / "f.npz")
  io.save(path, io.FeatureSet(np.zeros((3, 2), np.float32), y,
                              np.array(["a", "b", "c"]), meta))
  got = scoring.read_label_space(io.load(path).meta, path)
  assert got == spec_space.for_scoring()
  assert got.subset == (None if spec_space.subset is None
                        else tuple(_shipped_indices(dataset)))
  assert got.primary == {"imagenet_real": "real_top1", "imagenet_r": "subset_top1",
                         "imagenet_a": "subset_top1"}.get(dataset, "top1")


# ------------------------------------------------------------------ scoring


def test_real_top1_is_the_real_papers_rule(no_registry):
  rng = np.random.default_rng(0)
  n = 40
  y = np.zeros((n, 1000), np.int8)
  sets = []
  for i in range(n):
    sets.append(set(rng.choice(1000, rng.integers(0, 4), replace=False).tolist()))
    y[i, list(sets[-1])] = 1  # an empty set: not scored
  assert 0 < sum(not s for s in sets) < n
  first = np.array([min(s) if s else 0 for s in sets])
  s = _scores_with_hits(first, np.arange(1000), rng)
  test = scoring.resolve(y, feature_meta("imagenet_real", "validation", n), "real.npz")
  got = scoring.evaluate(s, test)
  scored = [i for i in range(n) if sets[i]]
  ref = 100 * sum(int(np.argmax(s[i])) in sets[i] for i in scored) / len(scored)
  assert list(got) == ["real_top1"]  # no single-label top-1/top-5 for ReaL
  assert got["real_top1"] == pytest.approx(ref, abs=1e-9)
  assert 0 < ref < 100
  assert test.n_examples("real_top1") == len(scored) and test.num_scored == len(scored)


@pytest.mark.parametrize("dataset", ["imagenet_r", "imagenet_a"])
@pytest.mark.parametrize("stored", ["full", "positions"])
def test_subset_top1_restricts_scores(dataset, stored, no_registry):
  rng = np.random.default_rng(1)
  sub = np.asarray(_shipped_indices(dataset))
  outside = np.setdiff1d(np.arange(1000), sub)
  pos = rng.integers(0, 200, 60)
  y_full = sub[pos]
  s = _scores_with_hits(y_full, outside, rng)
  # the registry stores 1000-class indices; an ImageFolder over the 200 wnid
  # folders (labelled elsewhere) would give positions 0..199
  got = score(s, feature_set(y_full if stored == "full" else pos, dataset))
  restricted = sub[s[:, sub].argmax(1)]
  ref_sub = 100 * np.mean(restricted == y_full)
  ref_top1 = 100 * np.mean(s.argmax(1) == y_full)
  assert list(got) == ["subset_top1", "top1", "top5"]
  assert got["subset_top1"] == pytest.approx(ref_sub, abs=1e-9)
  assert got["top1"] == pytest.approx(ref_top1, abs=1e-9)
  assert got["top5"] == pytest.approx(_np_topk(s, y_full, 5), abs=1e-9)
  assert ref_sub > ref_top1 + 10  # the decoys outside the subset are ignored


@pytest.mark.parametrize("dataset", ["imagenet_r", "imagenet_a"])
@pytest.mark.parametrize("old", ["subset_size_only", "no_label_space"])
def test_files_without_recorded_subset_score_identically(dataset, old):
  """Feature files written before the subset travelled in the meta (compat path)."""
  rng = np.random.default_rng(4)
  sub = np.asarray(_shipped_indices(dataset))
  y = sub[rng.integers(0, 200, 50)]
  s = _scores_with_hits(y, np.setdiff1d(np.arange(1000), sub), rng)
  new = feature_set(y, dataset)
  legacy = feature_set(y, dataset, space=_legacy(SPACES[dataset]))
  if old == "no_label_space":
    del legacy.meta["source"]
  assert label_space_lib.recorded_json(new.meta)["subset"]
  assert scoring.read_label_space(legacy.meta, "old.npz") == scoring.read_label_space(
      new.meta, "new.npz")
  a, b = score(s, new), score(s, legacy)
  assert list(a) == list(b) and all(repr(a[k]) == repr(b[k]) for k in a)
  for k in (0, 1):  # and with kNN's top-5
    a = score(np.maximum(s, 0), new, positive_only_top5=bool(k))
    b = score(np.maximum(s, 0), legacy, positive_only_top5=bool(k))
    assert all(repr(a[m]) == repr(b[m]) for m in a)


def test_mean_per_class_and_padding(monkeypatch):
  """A label space listing mean_per_class; chunks that do not divide N."""
  monkeypatch.setattr(scoring, "_CHUNK", 16)
  rng = np.random.default_rng(2)
  space = {"name": "toy", "num_classes": 7, "multi_label": False,
           "subset_size": None, "metrics": ["mean_per_class", "top1"]}
  y = rng.choice([0, 1, 1, 1, 3, 5, 5, 6], 45)  # classes 2 and 4 absent
  s = _scores_with_hits(y, np.arange(7), rng, 7)
  got = score(s, feature_set(y, "toy", space=space), "toy.npz")
  pred = s.argmax(1)
  per_class = [np.mean(pred[y == c] == c) for c in np.unique(y)]
  assert list(got) == ["mean_per_class", "top1", "top5"]
  assert got["mean_per_class"] == pytest.approx(100 * np.mean(per_class), abs=1e-9)
  assert got["top1"] == pytest.approx(100 * np.mean(pred == y), abs=1e-9)
  assert got["top5"] == pytest.approx(_np_topk(s, y, 5), abs=1e-9)
  assert sk_metrics.balanced_accuracy_score(y, pred) * 100 == pytest.approx(
      got["mean_per_class"], abs=1e-9)


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
    got = score(s, fs)
    assert list(got) == ["top1", "top5"]
    assert got["top1"] == pytest.approx(100 * np.mean(s.argmax(1) == y), abs=1e-9)
    assert got["top5"] == pytest.approx(_np_topk(s, y, 5), abs=1e-9)
  assert scoring.read_label_space({"dataset": "digits"}, "x").num_classes == 10
  assert scoring.read_label_space({"arch": "pixels"}, "x") is None


# ------------------------------------------------------------------ top-k


def test_topk_correct_matches_numpy_and_sklearn(monkeypatch):
  monkeypatch.setattr(scoring, "_CHUNK", 64)  # several chunks, a padded last one
  rng = np.random.default_rng(5)
  n, c = 203, 12
  y = rng.integers(0, c, n)
  tied = rng.integers(0, 4, (n, c)).astype(np.float32)  # many ties
  for k in (1, 2, 5, 12, 20):
    np.testing.assert_array_equal(scoring.topk_correct(tied, y, k),
                                  _np_topk_hits(tied, y, k))
  free = rng.normal(size=(n, c))  # tie-free: sklearn's definition applies
  for k in (1, 3, 5):
    got = 100 * np.mean(scoring.topk_correct(free, y, k))
    ref = 100 * sk_metrics.top_k_accuracy_score(y, free, k=k, labels=np.arange(c))
    assert got == pytest.approx(ref, abs=1e-9)
  # -0.0 and +0.0 are equal scores: the lower class index first, as argsort
  signed = np.array([[-0.0, 0.0, -1.0], [0.0, -0.0, -1.0]], np.float32)
  np.testing.assert_array_equal(scoring.topk_correct(signed, np.array([0, 0]), 1),
                                [True, True])
  # an unknown label (-1) is never a hit, even with every class in the top-k
  assert not scoring.topk_correct(tied[:3], np.array([-1, -1, -1]), c).any()
  # the same function inside jit (training-loop evaluation)
  jitted = jax.jit(lambda s, l: accuracy.topk_hits(s, l, 5))(tied, y)
  np.testing.assert_array_equal(np.asarray(jitted), _np_topk_hits(tied, y, 5))


def test_positive_only_never_counts_unvoted_classes():
  y = np.array([0, 0, 7, 3])
  s = np.zeros((4, 10), np.float32)
  s[0, [4, 6]] = [2.0, 1.0]      # label 0 unvoted: plain ranking puts it 3rd
  s[1, [0, 4]] = [0.5, 1.0]      # label 0 voted, 2nd
  s[2, [1, 2, 3, 4, 5, 7]] = [6, 5, 4, 3, 2, 1]  # voted but 6th
  s[3, 3] = 1.0
  np.testing.assert_array_equal(scoring.topk_correct(s, y, 5, positive_only=True),
                                [False, True, False, True])
  np.testing.assert_array_equal(scoring.topk_correct(s, y, 5), [True, True, False, True])
  fs = io.FeatureSet(np.zeros((4, 2), np.float32), y, np.arange(4).astype(str), {})
  plain = score(s, fs)
  ours = score(s, fs, positive_only_top5=True)
  assert plain["top5"] == pytest.approx(75.0) and ours["top5"] == pytest.approx(50.0)
  assert ours["top1"] == plain["top1"] == pytest.approx(25.0)


def test_positive_only_is_dinos_rule_on_vote_totals():
  """DINO counts top-5 over the min(5, k) best classes of the vote totals; with
  k neighbours at most k classes have votes, so the unvoted ones never count."""
  rng = np.random.default_rng(6)
  n, c, k = 300, 8, 3
  y = rng.integers(0, c, n)
  neighbours = rng.integers(0, c, (n, k))
  votes = np.zeros((n, c), np.float32)
  for i in range(n):
    for j, cls in enumerate(neighbours[i]):
      votes[i, cls] += np.float32(np.exp(-j))
  ref = np.array([y[i] in neighbours[i] and y[i] in
                  np.argsort(-votes[i], kind="stable")[:5] for i in range(n)])
  np.testing.assert_array_equal(
      scoring.topk_correct(votes, y, 5, positive_only=True), ref)
  assert ref.mean() < _np_topk_hits(votes, y, 5).mean()  # the rule matters here


# ----------------------------------------------------------- primary metric


def test_primary_metric():
  assert primary.primary_metric({"top1", "top5", "subset_top1"}) == "subset_top1"
  assert primary.primary_metric(["real_top1"]) == "real_top1"
  assert primary.primary_metric(["top5", "top1", "mean_per_class"]) == "top1"
  assert primary.primary_metric(["top1_mean"]) is None
  from sslbench_jax.analysis import table  # pylint: disable=g-import-not-at-top
  from sslbench_jax.results import store  # pylint: disable=g-import-not-at-top
  assert store.PRIMARY_METRICS is primary.PRIMARY_METRICS
  assert store.PRIMARY == table.PRIMARY == primary.PRIMARY
  # every registered space: its primary metric is one the scoring reports
  for name in registry.DATASETS:
    try:
      space = registry.get_spec(name).label_space(None)
    except Exception:  # pylint: disable=broad-except  (classes come from the data)
      continue
    test = scoring.EvalLabels("x", space.for_scoring(),
                              np.zeros((1, 1000), bool) if space.multi_label
                              else np.zeros(1, np.int64))
    assert space.metric in test.metric_names()
    assert space.metric == primary.primary_metric(test.metric_names())


# ------------------------------------------------------------------- errors


def test_errors():
  y = np.arange(5)
  resolve = lambda fs: scoring.resolve(fs.labels, fs.meta, "x.npz")
  with pytest.raises(ValueError, match="unknown metric"):
    bad = dict(SPACES["imagenet1k"], metrics=["top3"])
    resolve(feature_set(y, "imagenet1k", space=bad))
  with pytest.raises(ValueError, match="x.npz: unknown label space 'my_subset'"):
    sub = dict(_legacy(SPACES["imagenet_r"]), name="my_subset")
    resolve(feature_set(y, "my_subset", space=sub))
  with pytest.raises(ValueError, match="x.npz: label space 'imagenet_r' records a 100"):
    resolve(feature_set(y, "imagenet_r", space=dict(_legacy(SPACES["imagenet_r"]),
                                                    subset_size=100)))
  with pytest.raises(ValueError, match="x.npz: label space 'imagenet_r'.*subset_size 200"):
    resolve(feature_set(y, "imagenet_r", space=dict(SPACES["imagenet_r"],
                                                    subset=[1, 2, 3])))
  with pytest.raises(ValueError, match="x.npz: malformed label space"):
    resolve(feature_set(y, "imagenet1k", space=["top1"]))
  with pytest.raises(ValueError, match="x.npz: label space 'imagenet1k'.*not an integer"):
    resolve(feature_set(y, "imagenet1k", space=dict(SPACES["imagenet1k"],
                                                    num_classes="1000")))
  with pytest.raises(ValueError, match="neither classes of 'imagenet_r'"):
    resolve(feature_set(np.array([0, 999]), "imagenet_r"))
  with pytest.raises(ValueError, match="no label space"):
    resolve(io.FeatureSet(np.zeros((2, 2), np.float32), np.eye(2, dtype=np.int8),
                          np.array(["a", "b"]), {}))
  with pytest.raises(ValueError, match="do not fit label space 'imagenet1k'"):
    resolve(feature_set(np.zeros((2, 1000), np.int8), "imagenet1k"))
  with pytest.raises(ValueError, match="x.npz: label space 'imagenet1k' has 1000 "
                     "classes but the probe scores 10"):
    scoring.evaluate(np.zeros((5, 10)), resolve(feature_set(y, "imagenet1k")))
  with pytest.raises(ValueError, match="unknown label -1"):
    resolve(feature_set(np.array([1, -1]), "imagenet1k"))
  with pytest.raises(ValueError, match="x.npz: no examples"):
    resolve(feature_set(np.zeros(0, np.int64), "imagenet1k"))
