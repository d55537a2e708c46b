"""convert_checkpoint on ResNet checkpoints laid out as each SSL release does.

Each test builds the PyTorch reference ResNet with random weights and random
BatchNorm statistics, saves it under a real release's key layout (wrappers,
prefixes, heads, momentum encoders, optimizer state), converts the file on
disk, and compares the Flax representation with PyTorch's on the same input.
"""

import argparse

import numpy as np
import pytest
from safetensors.torch import save_file as save_safetensors
import torch

from sslbench_jax.backbones import registry
from sslbench_jax.backbones import weights
from sslbench_jax.convert import ConversionError
from sslbench_jax.convert import convert_checkpoint
import torch_resnet

_INPUT = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)


def _model(arch="resnet18", seed=0, num_classes=None):
  return torch_resnet.randomize(torch_resnet.resnet(arch, num_classes), seed)


def _backbone_state(model, prefix=""):
  return {prefix + k: v for k, v in model.state_dict().items()
          if not k.startswith("fc.")}


def _mlp(prefix, dims=(512, 64, 16)):
  g = torch.Generator().manual_seed(99)
  out = {}
  for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
    out[f"{prefix}{2 * i}.weight"] = torch.randn(b, a, generator=g)
    out[f"{prefix}{2 * i}.bias"] = torch.randn(b, generator=g)
  return out


def _torch_features(model, x=_INPUT):
  with torch.no_grad():
    return model.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _assert_parity(variables, meta, model, x=_INPUT):
  out = registry.create_model(meta["arch"], **meta["arch_options"]).apply(
      variables, x, train=False)
  np.testing.assert_allclose(out["pre_logits"], _torch_features(model, x),
                             atol=1e-4, rtol=0)
  return out


def _save(tmp_path, obj, name="ckpt.pth", **kwargs):
  path = str(tmp_path / name)
  torch.save(obj, path, **kwargs)
  return path


def test_torchvision_classifier_gives_logits(tmp_path):
  model = _model(num_classes=1000, seed=1)
  path = _save(tmp_path, model.state_dict())
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["source"] == "plain" and meta["prefix"] == ""
  assert meta["arch_options"] == {"num_classes": 1000}
  out = _assert_parity(variables, meta, model)
  with torch.no_grad():
    ref = model(torch.from_numpy(_INPUT.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(out["logits"], ref, atol=1e-4, rtol=0)


def test_classifier_can_be_dropped_by_option(tmp_path):
  model = _model(num_classes=1000, seed=1)
  path = _save(tmp_path, model.state_dict())
  variables, meta = convert_checkpoint(path, "resnet18",
                                       options={"num_classes": None})
  assert "fc" not in variables["params"]
  assert meta["dropped_keys"] == ["fc.bias", "fc.weight"]
  _assert_parity(variables, meta, model)


def test_moco_v2_takes_encoder_q_and_drops_mlp_and_encoder_k(tmp_path):
  q, k = _model(seed=2), _model(seed=3)
  state = {**_backbone_state(q, "module.encoder_q."), **_mlp("module.encoder_q.fc."),
           **_backbone_state(k, "module.encoder_k."), **_mlp("module.encoder_k.fc."),
           "module.queue": torch.randn(16, 8), "module.queue_ptr": torch.zeros(1)}
  path = _save(tmp_path, {"epoch": 800, "arch": "resnet18", "state_dict": state,
                          "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
               name="moco_v2_800ep_pretrain.pth.tar")
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["source"] == "moco_v1_v2"
  assert meta["prefix"] == "state_dict.module.encoder_q."
  assert "state_dict.module.encoder_q.fc.0.weight" in meta["dropped_keys"]
  assert "state_dict.module.queue" in meta["dropped_keys"]
  assert meta["arch_options"] == {}
  _assert_parity(variables, meta, q)


def test_moco_v1_linear_projection_is_not_a_classifier(tmp_path):
  q = _model(seed=4)
  state = {**_backbone_state(q, "module.encoder_q."),
           "module.encoder_q.fc.weight": torch.randn(128, 512),
           "module.encoder_q.fc.bias": torch.randn(128)}
  path = _save(tmp_path, {"state_dict": state})
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["arch_options"] == {}
  assert "state_dict.module.encoder_q.fc.weight" in meta["dropped_keys"]
  _assert_parity(variables, meta, q)


def test_moco_v3_requires_a_choice(tmp_path):
  base, momentum = _model(seed=5), _model(seed=6)
  state = {**_backbone_state(base, "module.base_encoder."),
           **_mlp("module.base_encoder.fc."),
           **_backbone_state(momentum, "module.momentum_encoder."),
           **_mlp("module.momentum_encoder.fc."), **_mlp("module.predictor.")}
  path = _save(tmp_path, {"epoch": 1000, "state_dict": state})
  with pytest.raises(ConversionError, match="select='base_encoder' or "
                     "select='momentum_encoder'"):
    convert_checkpoint(path, "resnet18")
  variables, meta = convert_checkpoint(path, "resnet18", select="momentum_encoder")
  assert meta["source"] == "moco_v3"
  assert meta["prefix"] == "state_dict.module.momentum_encoder."
  _assert_parity(variables, meta, momentum)
  variables, meta = convert_checkpoint(path, "resnet18", select="base_encoder")
  _assert_parity(variables, meta, base)


def test_swav_family_resnet50_drops_projection_head_and_prototypes(tmp_path):
  model = _model("resnet50", seed=7)
  state = {**_backbone_state(model, "module."),
           **_mlp("module.projection_head.", (2048, 64, 16)),
           "module.prototypes.weight": torch.randn(30, 16)}
  path = _save(tmp_path, state, name="swav_800ep_pretrain.pth.tar")
  variables, meta = convert_checkpoint(path, "resnet50")
  assert meta["source"] == "swav_deepcluster_sela"
  assert meta["prefix"] == "module."
  assert set(meta["dropped_keys"]) == {
      "module.projection_head.0.weight", "module.projection_head.0.bias",
      "module.projection_head.2.weight", "module.projection_head.2.bias",
      "module.prototypes.weight"}
  n_tensors = sum(not k.endswith("num_batches_tracked") for k in model.state_dict())
  assert meta["counts"]["mapped"] == n_tensors
  assert meta["counts"]["counters"] == len(model.state_dict()) - n_tensors
  _assert_parity(variables, meta, model)


def test_dino_prefers_teacher_and_can_select_student(tmp_path):
  teacher, student = _model(seed=8), _model(seed=9)
  ckpt = {"teacher": {**_backbone_state(teacher, "backbone."), **_mlp("head.mlp.")},
          "student": {**_backbone_state(student, "module.backbone."),
                      **_mlp("module.head.mlp.")},
          "epoch": 100, "args": argparse.Namespace(arch="resnet18", lr=0.1),
          "dino_loss": {"center": torch.zeros(1, 16)}}
  path = _save(tmp_path, ckpt, name="checkpoint.pth")
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["source"] == "dino" and meta["prefix"] == "teacher.backbone."
  _assert_parity(variables, meta, teacher)
  variables, meta = convert_checkpoint(path, "resnet18", select="student")
  assert meta["prefix"] == "student.module.backbone."
  _assert_parity(variables, meta, student)


def test_vissl_trunk(tmp_path):
  model = _model(seed=10)
  ckpt = {"phase_idx": 104, "classy_state_dict": {"base_model": {"model": {
      "trunk": _backbone_state(model, "_feature_blocks."),
      "heads": _mlp("0.clf.")}}}}
  path = _save(tmp_path, ckpt, name="model_final_checkpoint_phase104.torch")
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["source"] == "vissl"
  assert meta["prefix"] == "classy_state_dict.base_model.model.trunk._feature_blocks."
  assert "classy_state_dict.base_model.model.heads.0.clf.0.weight" in meta["dropped_keys"]
  _assert_parity(variables, meta, model)


def test_npid_numpy_arrays_in_legacy_format(tmp_path):
  model = _model(seed=11)
  state = {"module." + k: v.numpy() for k, v in model.state_dict().items()}
  path = _save(tmp_path, {"model_state_dict": state},
               name="converted_vissl_rn18_npid.torch",
               _use_new_zipfile_serialization=False)
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["source_format"] == "torch_legacy"
  assert meta["source"] == "vissl_npid"
  assert meta["prefix"] == "model_state_dict.module."
  _assert_parity(variables, meta, model)


def test_mmselfsup_backbone(tmp_path):
  model = _model(seed=12)
  ckpt = {"meta": {"epoch": 200, "mmengine_version": "0.4.0"},
          "state_dict": {**_backbone_state(model, "backbone."),
                         **_mlp("neck.projector."), **_mlp("head.predictor."),
                         "data_preprocessor.mean": torch.zeros(3, 1, 1)}}
  path = _save(tmp_path, ckpt)
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["source"] == "mmselfsup" and meta["prefix"] == "state_dict.backbone."
  assert "state_dict.neck.projector.0.weight" in meta["dropped_keys"]
  _assert_parity(variables, meta, model)


@pytest.mark.parametrize("online,target", [
    ("online_backbone.module.", "target_backbone.module."),
    ("online_network.encoder.", "target_network.encoder."),
])
def test_byol_ports_take_online_network(tmp_path, online, target):
  on, tg = _model(seed=13), _model(seed=14)
  ckpt = {**{online + k: v for k, v in _backbone_state(on).items()},
          **{target + k: v for k, v in _backbone_state(tg).items()},
          **_mlp(online.split(".")[0] + ".projector.")}
  nested = {}
  for key, value in ckpt.items():
    top, rest = key.split(".", 1)
    nested.setdefault(top, {})[rest] = value
  path = _save(tmp_path, nested)
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["source"] == "byol" and meta["prefix"] == online
  _assert_parity(variables, meta, on)
  variables, meta = convert_checkpoint(path, "resnet18", select="target")
  _assert_parity(variables, meta, tg)


def test_resnet50x2_wide_and_written_to_disk(tmp_path):
  model = _model("resnet50x2", seed=15)
  path = _save(tmp_path, {"state_dict": _backbone_state(model, "module.")})
  out = str(tmp_path / "w" / "r50x2.npz")
  _, meta = convert_checkpoint(path, "resnet50x2", out)
  variables, saved_meta = weights.load_variables(out)
  assert saved_meta["arch"] == "resnet50x2"
  assert saved_meta["checkpoint_sha256"] == weights.sha256_file(path)
  assert saved_meta["counts"] == meta["counts"]
  x = np.random.RandomState(1).randn(1, 32, 32, 3).astype(np.float32)
  out_features = _assert_parity(variables, saved_meta, model, x)["pre_logits"]
  assert out_features.shape == (1, 4096)


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_safetensors_and_npz_sources(tmp_path, fmt):
  model = _model(seed=16)
  state = {"backbone." + k: v.contiguous() for k, v in model.state_dict().items()}
  path = str(tmp_path / f"m.{fmt}")
  if fmt == "safetensors":
    save_safetensors(state, path)
  else:
    np.savez(path, **{k: v.numpy() for k, v in state.items()})
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["source_format"] == fmt and meta["prefix"] == "backbone."
  _assert_parity(variables, meta, model)
