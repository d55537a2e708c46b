"""Bad checkpoints fail with one actionable line and write nothing."""

import os

import numpy as np
import pytest
import torch

from sslbench_jax.backbones import registry
from sslbench_jax.convert import ConversionError
from sslbench_jax.convert import convert_checkpoint
import torch_resnet


@pytest.fixture(scope="module")
def rn50_path(tmp_path_factory):
  model = torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed=0)
  path = str(tmp_path_factory.mktemp("ckpt") / "rn50.pth")
  torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
             path)
  return path


@pytest.fixture(scope="module")
def rn18():
  return torch_resnet.randomize(torch_resnet.resnet("resnet18"), seed=1)


def _save(tmp_path, state, name="c.pth", **kwargs):
  path = str(tmp_path / name)
  torch.save(state, path, **kwargs)
  return path


def _fails(tmp_path, path, arch, match, **kwargs):
  out_dir = tmp_path / "out"
  with pytest.raises(ConversionError, match=match) as info:
    convert_checkpoint(path, arch, str(out_dir / "w.npz"), **kwargs)
  message = str(info.value)
  assert "\n" not in message
  assert not out_dir.exists() or not os.listdir(out_dir)  # nothing written
  return message


def test_resnet50_as_resnet18_names_the_right_arch(tmp_path, rn50_path):
  _fails(tmp_path, rn50_path, "resnet18",
         r"bottleneck blocks 3-4-6-3 and width x1 \(layer1.0.conv3.weight, 16 "
         r"blocks layer1-4, conv1.weight \(64, 3, 7, 7\)\), not resnet18: "
         "use arch=resnet50")


def test_resnet50_as_resnet50x2(tmp_path, rn50_path):
  _fails(tmp_path, rn50_path, "resnet50x2", "width x1 .*use arch=resnet50$")


def test_resnet50_as_vit_says_what_it_is(tmp_path, rn50_path):
  if registry.family("vit_base_patch16") != "vit":
    pytest.skip("no vit arch")
  try:
    __import__("sslbench_jax.convert.vit_keys")
  except ImportError:
    pytest.skip("vit key map not available yet")
  message = _fails(tmp_path, rn50_path, "vit_base_patch16", "no vit backbone")
  assert "resnet" in message


def test_truncated_file(tmp_path, rn18):
  for fmt, kwargs in [("zip", {}), ("legacy", {"_use_new_zipfile_serialization": False})]:
    path = _save(tmp_path, rn18.state_dict(), f"{fmt}.pth", **kwargs)
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[: len(data) * 2 // 3])
    _fails(tmp_path, path, "resnet18", "truncated|damaged")


def test_jpeg_renamed_pth(tmp_path):
  path = tmp_path / "photo.pth"
  path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200))
  _fails(tmp_path, str(path), "resnet18", "not a checkpoint .looks like a JPEG")


def test_text_file(tmp_path):
  path = tmp_path / "model.pth.tar"
  path.write_text("<!DOCTYPE html><title>Google Drive - quota exceeded</title>")
  _fails(tmp_path, str(path), "resnet18", "not a checkpoint .looks like a text file")


def test_random_binary_and_plain_pickle(tmp_path):
  path = tmp_path / "r.pth"
  path.write_bytes(np.random.RandomState(0).bytes(300))
  _fails(tmp_path, str(path), "resnet18", "not a checkpoint|cannot read")
  path.write_bytes(b"\x80\x04K\x05.")  # pickle of the int 5, no torch magic
  _fails(tmp_path, str(path), "resnet18", "cannot read|magic")


def test_no_tensors(tmp_path):
  path = _save(tmp_path, {"epoch": 3})
  _fails(tmp_path, path, "resnet18", "holds no tensors")


def test_pickled_module_instead_of_state_dict(tmp_path, rn18):
  path = _save(tmp_path, rn18)
  _fails(tmp_path, path, "resnet18", "holds no tensors .a pickled nn.Module")


def test_shape_mismatch_names_the_leaf(tmp_path, rn18):
  state = dict(rn18.state_dict())
  state["layer2.1.conv2.weight"] = torch.zeros(128, 128, 1, 1)
  path = _save(tmp_path, state)
  _fails(tmp_path, path, "resnet18",
         r"shape mismatch for params/layer2_1/conv2/kernel: checkpoint gives "
         r"\(1, 1, 128, 128\), the model expects \(3, 3, 128, 128\)")


def test_unexpected_extra_tensor(tmp_path, rn18):
  state = {**rn18.state_dict(), "layer3.0.se.fc1.weight": torch.zeros(8, 256)}
  path = _save(tmp_path, state)
  _fails(tmp_path, path, "resnet18", "does not use: layer3.0.se.fc1.weight")


def test_missing_tensor_and_allow_missing(tmp_path, rn18):
  state = {k: v for k, v in rn18.state_dict().items()
           if not k.startswith("layer4.1.bn2.running_")}
  path = _save(tmp_path, state)
  _fails(tmp_path, path, "resnet18", "lacks tensor 'layer4.1.bn2.running_mean'")
  out = str(tmp_path / "ok" / "w.npz")
  variables, meta = convert_checkpoint(path, "resnet18", out,
                                       allow_missing=r"layer4\.1\.bn2\.running_")
  assert meta["missing_keys"] == ["layer4.1.bn2.running_mean",
                                  "layer4.1.bn2.running_var"]
  assert meta["counts"]["missing_allowed"] == 2
  assert os.path.exists(out) and os.path.exists(out + ".json")
  stats = variables["batch_stats"]["layer4_1"]["bn2"]
  # Flax's BatchNorm init (zeros / ones), since the checkpoint had nothing.
  np.testing.assert_array_equal(stats["mean"], np.zeros(512, np.float32))
  np.testing.assert_array_equal(stats["var"], np.ones(512, np.float32))
  np.testing.assert_array_equal(
      variables["batch_stats"]["layer4_0"]["bn2"]["var"],
      rn18.layer4[0].bn2.running_var.numpy())


def test_ambiguous_backbones_and_bad_select(tmp_path, rn18):
  state = {**{"model." + k: v for k, v in rn18.state_dict().items()},
           **{"model_ema." + k: v for k, v in rn18.state_dict().items()}}
  path = _save(tmp_path, state)
  _fails(tmp_path, path, "resnet18", "several backbones .'model.', 'model_ema.'")
  _fails(tmp_path, path, "resnet18", "select='student' matches 0", select="student")


def test_unknown_arch_and_bad_regex(tmp_path, rn18):
  path = _save(tmp_path, rn18.state_dict())
  _fails(tmp_path, path, "resnet19", "Unknown architecture 'resnet19'")
  _fails(tmp_path, path, "resnet18", "allow_missing is not a valid regex",
         allow_missing="(")


def test_nonfinite_tensors_are_named_unless_allowed(tmp_path, rn18):
  state = {k: v.clone() for k, v in rn18.state_dict().items()}
  poisoned = ["conv1.weight", "layer1.0.bn1.running_var", "layer1.1.conv2.weight",
              "layer2.0.bn2.bias", "layer3.0.downsample.0.weight", "layer4.1.bn1.weight",
              "layer4.1.bn2.running_mean"]
  for i, name in enumerate(poisoned):
    state[name].view(-1)[i] = (float("nan"), float("inf"), -float("inf"))[i % 3]
  path = _save(tmp_path, state)
  # Independent count of what the file holds: torch's own reading of it.
  loaded = torch.load(path, weights_only=True)
  bad = sorted(k for k, v in loaded.items()
               if v.is_floating_point() and not torch.isfinite(v).all())
  assert bad == sorted(poisoned)
  _fails(tmp_path, path, "resnet18",
         r"c.pth: 7 tensor\(s\) hold NaN/Inf values: " + ", ".join(bad[:5]).replace(".", r"\.")
         + r" \.\.\. \(\+2 more\); pass --allow_nonfinite")
  out = str(tmp_path / "ok" / "w.npz")
  variables, meta = convert_checkpoint(path, "resnet18", out, allow_nonfinite=True)
  assert meta["nonfinite_tensors"] == bad
  kernel = variables["params"]["conv1"]["kernel"]
  assert np.isnan(kernel).sum() == 1 and np.isnan(kernel[0, 0, 0, 0])
  assert np.isposinf(variables["batch_stats"]["layer1_0"]["bn1"]["var"][1])
  clean, clean_meta = convert_checkpoint(_save(tmp_path, rn18.state_dict(), "ok.pth"),
                                         "resnet18")
  assert clean_meta["nonfinite_tensors"] == []
