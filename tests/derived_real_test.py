"""ImageNet ReaL declared as derived from ImageNet-1k val, and its features cut
out of val's (data.derived), vs a reference built here from the ReaL rule:
keep the val images whose ReaL label set is non-empty, in val order, with
multi-hot labels (Beyer et al. 2020, "Are we done with ImageNet?")."""

import importlib.resources
import json

import numpy as np
import pytest

from sslbench_jax.data import derived
from sslbench_jax.data import registry
from sslbench_jax.features import io
from sslbench_jax.metrics import scoring

# Val image numbers: 1, 22 and 37 have an empty ReaL set, 3 has two labels.
NUMBERS = (1, 2, 3, 4, 22, 37, 6, 40)


def _shipped_json(name):
  return json.loads(importlib.resources.files("sslbench_jax.data").joinpath(
      "meta", name).read_text())


@pytest.fixture
def val(tmp_path):
  """A flat ImageNet val folder and its (fake) val feature file."""
  root = tmp_path / "imagenet"
  (root / "val").mkdir(parents=True)
  names = sorted(f"ILSVRC2012_val_{n:08d}.JPEG" for n in NUMBERS)
  for name in names:
    (root / "val" / name).write_bytes(b"never decoded")
  val_labels = _shipped_json("val_image_to_1k_label.json")
  x = np.random.default_rng(0).normal(size=(len(names), 6)).astype(np.float32)
  meta = {"arch": "resnet18", "dataset": "imagenet1k", "split": "validation",
          "preprocessing": "imagenet_bilinear", "cache_key": "c" * 64,
          "data_dir": str(root), "num_examples": len(names), "num_skipped": 0,
          "representation": "pre_logits", "source": {"dataset": "imagenet1k"}}
  fs = io.FeatureSet(x, np.array([val_labels[n] for n in names], np.int64),
                     np.array(names), meta)
  path = str(tmp_path / "m__imagenet1k_validation__pre_logits.npz")
  io.save(path, fs)
  return dict(root=str(root), names=names, path=path)


def test_registry_declares_real_derived_from_val():
  derived_names = [n for n in registry.DATASETS if registry.get_spec(n).derived_from]
  assert derived_names == ["imagenet_real"]
  assert registry.get_spec("imagenet_real").info()["derived_from"] == "imagenet1k"
  assert derived.parent_split("imagenet_real", "validation") == ("imagenet1k", "validation")
  assert derived.parent_split("imagenet_real", "val") == ("imagenet1k", "validation")
  assert derived.parent_split("imagenet1k", "validation") is None
  assert derived.is_parent_split("imagenet_real", "validation", "imagenet1k", "val")
  assert not derived.is_parent_split("imagenet_real", "validation", "imagenet1k", "train")
  assert not derived.is_parent_split("imagenet_real", "validation", "imagenet_v2", "test")


def test_derived_real_equals_the_real_rule(val):
  parent = io.load(val["path"])
  got = derived.derive_features(parent, "imagenet_real", "validation",
                                data_dir=val["root"], parent_file=val["path"])
  real = _shipped_json("imagenet_real_labels.json")
  keep = [i for i, name in enumerate(val["names"]) if real[int(name[15:23]) - 1]]
  assert 0 < len(keep) < len(val["names"]) - 2  # three empty sets left out
  np.testing.assert_array_equal(got.features, parent.features[keep])
  np.testing.assert_array_equal(got.ids, np.array(val["names"])[keep])
  ref = np.zeros((len(keep), 1000), np.int8)
  for row, i in enumerate(keep):
    ref[row, real[int(val["names"][i][15:23]) - 1]] = 1
  assert got.labels.dtype == np.int8
  np.testing.assert_array_equal(got.labels, ref)
  # today's meta: the val meta, the ReaL dataset's own provenance, where it came from
  want = dict(parent.meta, dataset="imagenet_real", split="validation",
              num_examples=len(keep), num_skipped=0,
              source=registry.open_dataset("imagenet_real", "validation",
                                           data_dir=val["root"],
                                           preprocessing="imagenet_bilinear").describe(),
              derived_from={"file": "m__imagenet1k_validation__pre_logits.npz",
                            "dataset": "imagenet1k", "split": "validation",
                            "cache_key": "c" * 64})
  del want["cache_key"]
  assert got.meta == want
  assert got.meta["source"]["label_space"] == {
      "name": "imagenet_real", "num_classes": 1000, "multi_label": True,
      "subset_size": None, "metrics": ["real_top1"]}

  # Written and read back, the file is scored by the ReaL rule.
  out = val["path"].replace("imagenet1k", "real")
  io.save(out, got)
  test = scoring.resolve(io.load(out).labels, io.load(out).meta, out)
  scores = np.random.default_rng(1).normal(size=(len(keep), 1000))
  values = scoring.evaluate(scores.astype(np.float32), test)
  pred = scores.astype(np.float32).argmax(1)
  assert values == {"real_top1": pytest.approx(100 * np.mean(
      [ref[r, pred[r]] == 1 for r in range(len(keep))]), abs=1e-9)}


def test_not_derivable_means_none(val):
  parent = io.load(val["path"])
  cases = {
      "rows skipped": dict(parent.meta, num_skipped=1),
      "another dataset": dict(parent.meta, dataset="imagenet_v2"),
      "another split": dict(parent.meta, split="train"),
      "no preprocessing": {k: v for k, v in parent.meta.items() if k != "preprocessing"},
  }
  for why, meta in cases.items():
    fs = io.FeatureSet(parent.features, parent.labels, parent.ids, meta)
    assert derived.derive_features(fs, "imagenet_real", "validation",
                                   data_dir=val["root"]) is None, why
  shuffled = io.FeatureSet(parent.features, parent.labels, parent.ids[::-1].copy(),
                           parent.meta)
  assert derived.derive_features(shuffled, "imagenet_real", "validation",
                                 data_dir=val["root"]) is None
  assert derived.derive_features(parent, "imagenet_real", "validation",
                                 data_dir=val["root"] + "/missing") is None
  with pytest.raises(ValueError, match="imagenet1k is not derived"):
    derived.derive_features(parent, "imagenet1k", "validation", data_dir=val["root"])
