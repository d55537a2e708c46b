"""Release layouts the converter handles, each written as its official code saves it.

Key names and wrappers are read from each framework's own code:

* PCL (salesforce/PCL ``pcl/builder.py`` + ``main_pcl.py``): DDP ``module.encoder_q``
  / ``encoder_k`` with a 2-layer MLP ``fc.0``/``fc.2`` (v2), ``queue``, under
  ``state_dict`` next to ``optimizer``.
* SimSiam (facebookresearch/simsiam ``simsiam/builder.py``): ``module.encoder``
  whose ``fc`` is the 3-layer projector (``fc.0``, ``fc.1`` BN, ``fc.3``,
  ``fc.4`` BN, ``fc.6``, ``fc.7`` affine-free BN) and ``module.predictor``.
* VICReg (facebookresearch/vicreg ``main_vicreg.py``): ``resnet50.pth`` is
  ``model.module.backbone.state_dict()``; the full checkpoint is
  ``{"epoch", "model": {backbone., projector.}, "optimizer"}``. Its ResNet pads
  the input by 1 and conv1 by 2 (= torchvision's 3) under torchvision names.
* OBoW (valeoai/obow ``save_feature_extractor_in_torchvision_format``):
  ``{"network": torchvision resnet state_dict}`` whose ``fc`` is the 8192-word
  BoW predictor.
* DenseCL (WXinlong/DenseCL ``tools/extract_backbone_weights.py``):
  ``{"state_dict": backbone, "author": "DenseCL"}``.
* MILAN (zejiangh/MILAN ``models_milan.py``, MAE's saver): timm encoder + MAE
  decoder (``decoder_blocks.N.attn.q``/``kv``), ``mask_token``, under ``model``.
* BEiT v2 pretraining (microsoft/unilm beit2): shared ``rel_pos_bias``,
  ``gamma_1``/``gamma_2``, final ``norm`` and no ``fc_norm``; the Closer-Look
  study's representation is LayerNorm(mean patch token) with BEiT's fresh
  ``fc_norm`` (scale 1, bias 0), see docs/convert.md.

Each converted model is compared with the PyTorch module it came from.
"""

import argparse

import numpy as np
import pytest
import torch

import torch_resnet
import torch_vit
from sslbench_jax.backbones import registry
from sslbench_jax.convert import convert_checkpoint

_X = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)


def _rn(seed, arch="resnet18"):
  return torch_resnet.randomize(torch_resnet.resnet(arch), seed)


def _backbone(model, prefix=""):
  return {prefix + k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _linear(out_f, in_f, bias=True, seed=0):
  g = torch.Generator().manual_seed(seed)
  w = {"weight": torch.randn(out_f, in_f, generator=g)}
  if bias:
    w["bias"] = torch.randn(out_f, generator=g)
  return w


def _bn(n, affine=True):
  out = {"running_mean": torch.zeros(n), "running_var": torch.ones(n),
         "num_batches_tracked": torch.tensor(5)}
  if affine:
    out.update(weight=torch.ones(n), bias=torch.zeros(n))
  return out


def _put(state, prefix, params):
  state.update({f"{prefix}.{k}": v for k, v in params.items()})


def _save(tmp_path, obj, name):
  path = str(tmp_path / name)
  torch.save(obj, path)
  return path


def _resnet_parity(variables, meta, model, x=_X):
  out = registry.create_model(meta["arch"], **meta["arch_options"]).apply(
      variables, x, train=False)
  with torch.no_grad():
    ref = model.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(np.asarray(out["pre_logits"]), ref, atol=1e-4, rtol=0)
  return out


def test_pcl_v2(tmp_path):
  q, k = _rn(1), _rn(2)
  state = {}
  for name, enc in (("encoder_q", q), ("encoder_k", k)):
    state.update(_backbone(enc, f"module.{name}."))
    _put(state, f"module.{name}.fc.0", _linear(512, 512, seed=3))
    _put(state, f"module.{name}.fc.2", _linear(128, 512, seed=4))
  state["module.queue"] = torch.randn(128, 64)
  state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
  path = _save(tmp_path, {"epoch": 200, "arch": "resnet18", "state_dict": state,
                          "optimizer": {"state": {}, "param_groups": []}},
               "PCL_v2_epoch200.pth.tar")
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["prefix"] == "state_dict.module.encoder_q."
  assert meta["source"] == "moco_v1_v2" and meta["arch_options"] == {}
  assert "state_dict.module.encoder_q.fc.2.weight" in meta["dropped_keys"]
  assert "state_dict.module.queue" in meta["dropped_keys"]
  _resnet_parity(variables, meta, q)


def test_official_simsiam(tmp_path):
  enc = _rn(5)
  state = _backbone(enc, "module.encoder.")
  _put(state, "module.encoder.fc.0", _linear(512, 512, bias=False))
  _put(state, "module.encoder.fc.1", _bn(512))
  _put(state, "module.encoder.fc.3", _linear(512, 512, bias=False))
  _put(state, "module.encoder.fc.4", _bn(512))
  _put(state, "module.encoder.fc.6", _linear(2048, 512))
  _put(state, "module.encoder.fc.7", _bn(2048, affine=False))
  _put(state, "module.predictor.0", _linear(512, 2048, bias=False))
  _put(state, "module.predictor.1", _bn(512))
  _put(state, "module.predictor.3", _linear(2048, 512))
  path = _save(tmp_path, {"epoch": 100, "arch": "resnet18", "state_dict": state,
                          "optimizer": {}}, "checkpoint_0099.pth.tar")
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["prefix"] == "state_dict.module.encoder."
  assert meta["arch_options"] == {}  # the projector is not a classifier
  assert "state_dict.module.encoder.fc.6.weight" in meta["dropped_keys"]
  assert "state_dict.module.predictor.3.weight" in meta["dropped_keys"]
  _resnet_parity(variables, meta, enc)


@pytest.mark.parametrize("full", [False, True])
def test_vicreg(tmp_path, full):
  backbone = _rn(6)
  if full:
    state = _backbone(backbone, "backbone.")
    _put(state, "projector.0", _linear(64, 512))
    _put(state, "projector.1", _bn(64))
    _put(state, "projector.3", _linear(32, 64, bias=False))
    obj, name = {"epoch": 1000, "model": state, "optimizer": {}}, "model.pth"
  else:
    obj, name = _backbone(backbone), "resnet50.pth"
  variables, meta = convert_checkpoint(_save(tmp_path, obj, name), "resnet18")
  assert meta["prefix"] == ("model.backbone." if full else "")
  if full:
    assert "model.projector.3.weight" in meta["dropped_keys"]
  _resnet_parity(variables, meta, backbone)


def test_obow_torchvision_format(tmp_path):
  model = torch_resnet.randomize(torch_resnet.resnet("resnet18", num_classes=8192), 7)
  with torch.no_grad():
    model.fc.bias.zero_()  # OBoW fills the BoW head's bias with 0
  path = _save(tmp_path, {"network": model.state_dict()},
               "tochvision_resnet18_student_K8192_epoch200.pth.tar")
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["prefix"] == "network."
  # fc is the 8192-word BoW predictor; kept as logits unless num_classes=None.
  assert meta["arch_options"] == {"num_classes": 8192}
  out = _resnet_parity(variables, meta, model)
  with torch.no_grad():
    ref = model(torch.from_numpy(_X.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(np.asarray(out["logits"]), ref, atol=1e-4, rtol=0)
  variables, meta = convert_checkpoint(path, "resnet18", options={"num_classes": None})
  assert "network.fc.weight" in meta["dropped_keys"]


def test_densecl(tmp_path):
  backbone = _rn(8)
  path = _save(tmp_path, {"state_dict": _backbone(backbone), "author": "DenseCL"},
               "densecl_r50_imagenet_200ep.pth")
  variables, meta = convert_checkpoint(path, "resnet18")
  assert meta["prefix"] == "state_dict."
  _resnet_parity(variables, meta, backbone)


def _vit(**options):
  return torch_vit.VisionTransformer(patch_size=16, width=384, depth=2, num_heads=6,
                                     **options).randomize_(11).eval()


def _vit_parity(variables, meta, model, x):
  out = registry.create_model(meta["arch"], **meta["arch_options"]).apply(
      variables, x, train=False)
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  for key in ("pre_logits", "cls", "patch_mean"):
    np.testing.assert_allclose(np.asarray(out[key]), ref[key].numpy(), atol=1e-4,
                               rtol=0, err_msg=key)


def test_milan(tmp_path):
  model = _vit(img_size=96, pos_resize=torch_vit.mae_interpolate_pos_embed)
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  g = torch.Generator().manual_seed(2)
  sd["mask_token"] = torch.randn(1, 1, 256, generator=g)
  sd["decoder_embed.weight"] = torch.randn(256, 384, generator=g)
  sd["decoder_pos_embed"] = torch.zeros(1, 37, 256)
  sd["decoder_blocks.0.attn.q.weight"] = torch.randn(256, 256, generator=g)
  sd["decoder_blocks.0.attn.kv.weight"] = torch.randn(512, 256, generator=g)
  sd["decoder_norm.weight"] = torch.ones(256)
  sd["decoder_pred.weight"] = torch.randn(768, 256, generator=g)
  path = _save(tmp_path, {"model": sd, "optimizer": {}, "epoch": 399, "scaler": {},
                          "args": argparse.Namespace(model="mae_vit_base_patch16")},
               "milan_vitb16_clip_400ep.pth")
  variables, meta = convert_checkpoint(path, "vit_small_patch16", options={"depth": 2})
  opts = meta["arch_options"]
  assert meta["prefix"] == "model." and opts["pool"] == "cls" and opts["img_size"] == 96
  assert (opts["pos_interp_offset"], opts["pos_interp_antialias"]) == (0.0, False)
  assert "model.decoder_blocks.0.attn.kv.weight" in meta["dropped_keys"]
  assert "model.mask_token" in meta["dropped_keys"]
  _vit_parity(variables, meta, model, np.random.RandomState(3).randn(2, 64, 64, 3)
              .astype(np.float32))


def test_beit_v2_pretraining_follows_the_study(tmp_path):
  """LayerNorm(mean patch token) with BEiT's fresh fc_norm; `norm.*` dropped."""
  model = _vit(img_size=64, rel_pos_bias=True, pool="mean", layerscale=0.1)
  with torch.no_grad():
    model.fc_norm.weight.fill_(1.0)  # BEiT's _init_weights for the new fc_norm
    model.fc_norm.bias.zero_()
    model.blocks[1].attn.relative_position_bias_table.copy_(
        model.blocks[0].attn.relative_position_bias_table)  # one shared table
  sd = {}
  for k, v in model.state_dict().items():
    if k.startswith("fc_norm."):
      continue
    k = k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
    if ".attn.relative_position_" in k:
      k = "rel_pos_bias." + k.split(".attn.")[1]
    sd[k] = v.detach().clone()
  g = torch.Generator().manual_seed(4)
  sd["norm.weight"] = 1 + 0.2 * torch.randn(384, generator=g)  # pretraining's final norm
  sd["norm.bias"] = 0.2 * torch.randn(384, generator=g)
  sd["mask_token"] = torch.zeros(1, 1, 384)
  sd["lm_head.weight"] = torch.randn(8192, 384, generator=g)
  sd["cls_pt_layers.0.norm1.weight"] = torch.ones(384)
  path = _save(tmp_path, {"model": sd}, "beitv2_base_patch16_224_pt1k.pth")
  variables, meta = convert_checkpoint(path, "vit_small_patch16", options={"depth": 2})
  opts = meta["arch_options"]
  assert opts["pool"] == "mean" and opts["rel_pos_bias"] and opts["img_size"] == 64
  assert {"model.norm.weight", "model.norm.bias"} <= set(meta["dropped_keys"])
  np.testing.assert_array_equal(variables["params"]["fc_norm"]["scale"], np.ones(384))
  x = np.random.RandomState(5).randn(2, 64, 64, 3).astype(np.float32)
  _vit_parity(variables, meta, model, x)
  # Independent of the reference module: pre_logits = LN(mean patch token).
  out = registry.create_model(meta["arch"], **opts).apply(variables, x, train=False)
  assert np.abs(np.asarray(out["pre_logits"]).mean(-1)).max() < 1e-4
  np.testing.assert_allclose(np.asarray(out["pre_logits"]).std(-1), 1.0, atol=1e-3)
