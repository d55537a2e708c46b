"""The label space travels with the features: `features --dataset imagenet_r`
writes the class subset into the file, and scoring reads it from there alone.

A tiny ViT (random weights, saved like a converted checkpoint) extracts
features of a mocked ImageNet-R folder (<wnid>/ folders); the registry is then
made unusable and the file is scored against NumPy's restricted argmax.
"""

import importlib.resources
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from sslbench_jax.backbones import registry as backbones
from sslbench_jax.backbones import weights
from sslbench_jax.data import label_spaces
from sslbench_jax.data import registry
from sslbench_jax.features import command as features_command
from sslbench_jax.features import io
from sslbench_jax.metrics import label_space as label_space_lib
from sslbench_jax.metrics import scoring

ARCH = "vit_small_patch16"
OPTIONS = {"width": 32, "depth": 1, "num_heads": 2}


def _shipped(name):
  text = importlib.resources.files("sslbench_jax.data").joinpath("meta", name).read_text()
  return text.split()


def test_extracted_imagenet_r_file_is_scored_without_the_registry(tmp_path, monkeypatch):
  wnids = _shipped("imagenet_synsets.txt")
  subset = [int(i) for i in _shipped("imagenet_r_indices.txt")]
  classes = [subset[0], subset[7], subset[150]]
  rng = np.random.RandomState(0)
  for c in classes:
    (tmp_path / "r" / wnids[c]).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(rng.randint(0, 256, (40, 48, 3)).astype(np.uint8)).save(
          tmp_path / "r" / wnids[c] / f"{i}.jpg")
  model = backbones.create_model(ARCH, **OPTIONS)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  wpath = str(tmp_path / "tiny.npz")
  weights.save_variables(wpath, jax.tree.map(np.asarray, variables),
                         {"arch": ARCH, "arch_options": OPTIONS})
  out = str(tmp_path / "r.npz")
  opts = features_command.default_options()
  opts.update(weights=wpath, dataset="imagenet_r", split="test",
              data_dir=str(tmp_path / "r"), out=out, progress=False,
              representation="cls")
  features_command.run(opts)
  fs = io.load(out)
  recorded = fs.meta["source"]["label_space"]
  assert recorded["subset"] == subset and recorded["subset_size"] == 200
  np.testing.assert_array_equal(fs.labels, np.repeat(classes, 2))

  # From here on the file must describe itself.
  def fail(*args, **kwargs):
    raise AssertionError("label space looked up in the registry")
  monkeypatch.setattr(registry, "get_spec", fail)
  monkeypatch.setattr(label_space_lib, "legacy_label_space", fail)
  test = scoring.resolve(fs.labels, fs.meta, out)
  assert test.subset == tuple(subset) and test.space.primary == "subset_top1"
  s = np.random.default_rng(1).normal(size=(6, 1000)).astype(np.float32)
  s[:, 3] += 10.0  # class 3 (not in R's subset) wins the unrestricted argmax
  got = scoring.evaluate(s, test)
  sub = np.asarray(subset)
  y = np.repeat(classes, 2)
  assert got["subset_top1"] == pytest.approx(
      100 * np.mean(sub[s[:, sub].argmax(1)] == y), abs=1e-9)
  assert got["top1"] == 0.0


def test_extraction_itself_records_the_label_space(tmp_path):
  """`features.extract` writes a registry dataset's label space into the meta,
  whatever meta the caller gives (here none)."""
  from sslbench_jax.features import extract  # pylint: disable=g-import-not-at-top
  wnids = _shipped("imagenet_synsets.txt")
  subset = [int(i) for i in _shipped("imagenet_a_indices.txt")]
  rng = np.random.RandomState(1)
  for c in subset[:2]:
    (tmp_path / "a" / wnids[c]).mkdir(parents=True)
    Image.fromarray(rng.randint(0, 256, (20, 20, 3)).astype(np.uint8)).save(
        tmp_path / "a" / wnids[c] / "0.jpg")
  ds = registry.open_dataset("imagenet_a", "test", data_dir=str(tmp_path / "a"),
                             preprocessing="smoke_32")
  model = backbones.create_model("resnet18")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  result = extract.extract(model, variables, ds, batch_size_per_device=2, progress=False)
  recorded = result.features.meta["source"]["label_space"]
  assert recorded["subset"] == subset and recorded["metrics"] == ["subset_top1", "top1"]
  assert scoring.read_label_space(result.features.meta, "a.npz").subset == tuple(subset)
