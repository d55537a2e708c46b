"""Label metadata and label-space scoring helpers."""

import collections
import csv
import filecmp
import os

import numpy as np
import pytest

from sslbench_jax.data import label_spaces

from conftest import SHARED

_META = os.path.join(os.path.dirname(label_spaces.__file__), "meta")
_SHARED_META = os.path.join(SHARED, "data", "imagenet_meta")


def test_wnids_sorted_unique():
  wnids = label_spaces.imagenet_wnids()
  assert len(wnids) == 1000 == len(set(wnids))
  assert list(wnids) == sorted(wnids)
  assert all(w.startswith("n") and len(w) == 9 for w in wnids)
  assert len(label_spaces.imagenet_class_names()) == 1000
  assert label_spaces.imagenet_class_names()[0] == "tench"


def test_real_labels_count_and_histogram():
  real = label_spaces.real_labels()
  assert len(real) == 50000
  scored = [r for r in real if r]
  assert len(scored) == 46837
  assert all(0 <= c < 1000 for r in scored for c in r)
  # Histogram of label-set sizes as published in imagenet_variants.csv
  # (reference table in ../shared), parsed here from its notes.
  hist = collections.Counter(len(r) for r in scored)
  path = os.path.join(SHARED, "reference", "imagenet_variants.csv")
  if not os.path.exists(path):
    pytest.skip(f"{path} absent")
  with open(path) as f:
    row = next(r for r in csv.DictReader(f) if r["dataset"].startswith("ImageNet ReaL"))
  notes = row["verification_notes"].split("histogram")[1].split('"')[0]
  expected = dict(tuple(int(x) for x in kv.split(":")) for kv in notes.split())
  assert dict(hist) == expected


@pytest.mark.parametrize("kind", ["r", "a"])
def test_subset_indices_match_synsets(kind):
  indices = getattr(label_spaces, f"imagenet_{kind}_indices")()
  assert len(indices) == 200 == len(set(indices))
  assert list(indices) == sorted(indices) and 0 <= min(indices) and max(indices) < 1000
  with open(os.path.join(_META, f"imagenet_{kind}_synsets.txt")) as f:
    synsets = f.read().split()
  wnids = label_spaces.imagenet_wnids()
  assert [wnids[i] for i in indices] == synsets


def test_shipped_meta_identical_to_shared():
  if not os.path.isdir(_SHARED_META):
    pytest.skip(f"{_SHARED_META} absent")
  for name in ("imagenet_real_labels.json", "imagenet_synsets.txt",
               "imagenet_r_indices.txt", "imagenet_a_indices.txt"):
    assert filecmp.cmp(os.path.join(_META, name), os.path.join(_SHARED_META, name),
                       shallow=False), name


def test_subset_predict_restricts_logits():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(500, 1000)).astype(np.float32)
  space = label_spaces.imagenet_subset("imagenet_r", label_spaces.imagenet_r_indices())
  pred = space.predict(logits)
  # Reference: mask the 800 other classes with -inf, then argmax.
  masked = np.full_like(logits, -np.inf)
  idx = np.array(label_spaces.imagenet_r_indices())
  masked[:, idx] = logits[:, idx]
  np.testing.assert_array_equal(pred, masked.argmax(1))
  assert set(pred.tolist()) <= set(idx.tolist())
  # Unrestricted prediction differs for most rows (800 of 1000 classes outside).
  assert (pred != logits.argmax(1)).mean() > 0.6
  assert space.metrics == ("subset_top1", "top1")
  np.testing.assert_array_equal(label_spaces.imagenet().predict(logits), logits.argmax(1))


def test_multi_hot_and_validation():
  v = label_spaces.multi_hot((3, 7), 10)
  assert v.dtype == np.int8 and v.tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0]
  with pytest.raises(ValueError, match="names"):
    label_spaces.LabelSpace("x", 3, ("a", "b"))
  with pytest.raises(ValueError, match="top5"):
    label_spaces.LabelSpace("x", 2, ("a", "b"), metrics=("top5",))
  real = label_spaces.imagenet_real()
  assert real.multi_label and real.metric == "real_top1"
  assert len(label_spaces.VOC_CLASSES) == 21
