"""Hugging Face transformers checkpoints (model.safetensors / pytorch_model.bin).

Each case renames a random timm-named (tests/torch_vit.py) or torchvision
(tests/torch_resnet.py) PyTorch model's state dict into the transformers
class's names, written here from ``convert_dinov2_to_hf.py``,
``convert_vit_timm_to_pytorch.py`` and ``modeling_resnet.py`` (q/k/v split from
timm's fused ``qkv``), saves it like ``save_pretrained`` and checks the Flax
forward against the PyTorch model, including HF's LayerNorm epsilon and its
exact-size bicubic position-embedding resize at a smaller input.
"""

import numpy as np
import pytest
import safetensors.torch
import torch

import torch_resnet
import torch_vit
from sslbench_jax.backbones import registry
from sslbench_jax.convert import ConversionError, convert_checkpoint

_DEPTH = {"depth": 2}
_IMAGES = np.random.RandomState(0).randn(2, 56, 56, 3).astype(np.float32)


def _vit(arch, **options):
  m = registry.create_model(arch)
  return torch_vit.VisionTransformer(
      patch_size=m.patch_size, width=m.width, depth=2, num_heads=m.num_heads,
      pos_resize=torch_vit.mae_interpolate_pos_embed, **options).randomize_(3).eval()


def _hf_vit_state(model, dinov2: bool, prefix=""):
  """timm state dict -> Dinov2Model / ViTModel names."""
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  width = sd["cls_token"].shape[-1]
  out = {"embeddings.cls_token": sd["cls_token"],
         "embeddings.position_embeddings": sd["pos_embed"],
         "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
         "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
         "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
  if "reg_token" in sd:
    out["embeddings.register_tokens"] = sd["reg_token"]
  if dinov2:
    out["embeddings.mask_token"] = torch.zeros(1, width)
  names = ({"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2"} if dinov2 else
           {"norm1": "layernorm_before", "norm2": "layernorm_after",
            "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"})
  i = 0
  while f"blocks.{i}.norm1.weight" in sd:
    b, h = f"blocks.{i}.", f"encoder.layer.{i}."
    for timm, hf in names.items():
      for p in ("weight", "bias"):
        out[f"{h}{hf}.{p}"] = sd[f"{b}{timm}.{p}"]
    for p in ("weight", "bias"):
      q, k, v = sd[f"{b}attn.qkv.{p}"].split(width)
      out[f"{h}attention.attention.query.{p}"] = q.clone()
      out[f"{h}attention.attention.key.{p}"] = k.clone()
      out[f"{h}attention.attention.value.{p}"] = v.clone()
      out[f"{h}attention.output.dense.{p}"] = sd[f"{b}attn.proj.{p}"]
    if dinov2:
      out[f"{h}layer_scale1.lambda1"] = sd[f"{b}ls1.gamma"]
      out[f"{h}layer_scale2.lambda1"] = sd[f"{b}ls2.gamma"]
    i += 1
  return {prefix + k: v.contiguous() for k, v in out.items()}


def _save(tmp_path, state, fmt):
  if fmt == "safetensors":
    path = str(tmp_path / "model.safetensors")
    safetensors.torch.save_file(state, path, metadata={"format": "pt"})
  else:
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(state, path)
  return path


def _check_vit(variables, meta, model):
  flax_model = registry.create_model(meta["arch"], **meta["arch_options"])
  ours = flax_model.apply(variables, _IMAGES, train=False)
  with torch.no_grad():
    ref = model(torch.from_numpy(_IMAGES.transpose(0, 3, 1, 2).copy()))
  for key in ("pre_logits", "patch_mean", "last4_cls"):
    np.testing.assert_allclose(np.asarray(ours[key]), ref[key].numpy(),
                               atol=1e-4, rtol=0, err_msg=key)


@pytest.mark.parametrize("registers,fmt", [(0, "safetensors"), (4, "bin")])
def test_dinov2_model(tmp_path, registers, fmt):
  model = _vit("vit_small_patch14", layerscale=1e-5, num_registers=registers,
               img_size=112)
  path = _save(tmp_path, _hf_vit_state(model, dinov2=True), fmt)
  variables, meta = convert_checkpoint(path, "vit_small_patch14", options=_DEPTH)
  assert meta["prefix"] == "hf_dinov2."
  opts = meta["arch_options"]
  assert opts["num_registers"] == registers and opts["ln_eps"] == 1e-6
  assert (opts["pos_interp_offset"], opts["pos_interp_antialias"]) == (0.0, False)
  assert "hf_dinov2.mask_token" in meta["dropped_keys"]
  _check_vit(variables, meta, model)


def test_dinov2_for_image_classification_drops_classifier(tmp_path):
  model = _vit("vit_small_patch14", layerscale=1e-5, img_size=112)
  state = _hf_vit_state(model, dinov2=True, prefix="dinov2.")
  state["classifier.weight"] = torch.zeros(1000, 768)
  state["classifier.bias"] = torch.zeros(1000)
  variables, meta = convert_checkpoint(_save(tmp_path, state, "safetensors"),
                                       "vit_small_patch14", options=_DEPTH)
  assert meta["prefix"] == "dinov2.hf_dinov2."
  assert "classifier.weight" in meta["dropped_keys"]
  _check_vit(variables, meta, model)


def test_vit_model_with_pooler(tmp_path):
  model = _vit("vit_small_patch16", ln_eps=1e-12, img_size=96)
  state = _hf_vit_state(model, dinov2=False)
  state["pooler.dense.weight"] = torch.zeros(384, 384)
  state["pooler.dense.bias"] = torch.zeros(384)
  variables, meta = convert_checkpoint(_save(tmp_path, state, "safetensors"),
                                       "vit_small_patch16", options=_DEPTH)
  assert meta["prefix"] == "hf_vit." and meta["arch_options"]["ln_eps"] == 1e-12
  assert "pooler.dense.weight" in meta["dropped_keys"]
  _check_vit(variables, meta, model)


def test_vit_mae_for_pretraining_drops_decoder(tmp_path):
  model = _vit("vit_small_patch16", ln_eps=1e-12, img_size=96)
  state = _hf_vit_state(model, dinov2=False, prefix="vit.")
  state["decoder.decoder_embed.weight"] = torch.zeros(512, 384)
  state["decoder.mask_token"] = torch.zeros(1, 1, 512)
  state["decoder.decoder_layers.0.layernorm_before.weight"] = torch.ones(512)
  variables, meta = convert_checkpoint(_save(tmp_path, state, "bin"),
                                       "vit_small_patch16", options=_DEPTH)
  assert meta["prefix"] == "vit.hf_vit."
  assert "decoder.decoder_embed.weight" in meta["dropped_keys"]
  _check_vit(variables, meta, model)


def _hf_resnet_state(model, prefix=""):
  out = {}
  for k, v in model.state_dict().items():
    if k.startswith("fc."):
      continue
    parts = k.split(".")
    if parts[0] in ("conv1", "bn1"):
      kind = "convolution" if parts[0] == "conv1" else "normalization"
      name = f"embedder.embedder.{kind}.{parts[1]}"
    else:
      stage, block = int(parts[0][len("layer"):]) - 1, parts[1]
      base = f"encoder.stages.{stage}.layers.{block}."
      if parts[2] == "downsample":
        kind = "convolution" if parts[3] == "0" else "normalization"
        name = f"{base}shortcut.{kind}.{parts[4]}"
      else:
        kind = "convolution" if parts[2].startswith("conv") else "normalization"
        name = f"{base}layer.{int(parts[2][-1]) - 1}.{kind}.{parts[3]}"
    out[prefix + name] = v.detach().clone().contiguous()
  return out


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_model(tmp_path, arch):
  model = torch_resnet.randomize(torch_resnet.resnet(arch), seed=4)
  state = _hf_resnet_state(model, prefix="resnet.")
  state["classifier.1.weight"] = torch.zeros(1000, 2048 if arch == "resnet50" else 512)
  state["classifier.1.bias"] = torch.zeros(1000)
  variables, meta = convert_checkpoint(_save(tmp_path, state, "safetensors"), arch)
  assert meta["prefix"] == "resnet.hf_resnet."
  assert "classifier.1.weight" in meta["dropped_keys"]
  x = _IMAGES[:, :32, :32]
  ours = registry.create_model(arch, **meta["arch_options"]).apply(
      variables, x, train=False)["pre_logits"]
  with torch.no_grad():
    ref = model.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_swiglu_dinov2_names_the_tensor_and_layouts(tmp_path):
  model = _vit("vit_small_patch14", layerscale=1e-5, img_size=112)
  state = _hf_vit_state(model, dinov2=True)
  state["encoder.layer.0.mlp.weights_in.weight"] = state.pop("encoder.layer.0.mlp.fc1.weight")
  with pytest.raises(ConversionError, match=r"'encoder\.layer\.0\.mlp\.weights_in\.weight'"
                     r".*layout guessed: Hugging Face Dinov2Model; supported: .*MMSelfSup"):
    convert_checkpoint(_save(tmp_path, state, "safetensors"), "vit_small_patch14",
                       options=_DEPTH)


def test_unknown_hf_vit_says_layout_guessed_and_supported(tmp_path):
  """A DINOv3-style HF file: no translation; the error says what was guessed."""
  state = {"embeddings.cls_token": torch.zeros(1, 1, 384),
           "embeddings.patch_embeddings.weight": torch.zeros(384, 3, 16, 16),
           "layer.0.norm1.weight": torch.ones(384)}
  with pytest.raises(ConversionError, match="layout guessed: Hugging Face transformers "
                     "naming of a model not supported here .*supported: timm"):
    convert_checkpoint(_save(tmp_path, state, "safetensors"), "vit_small_patch16")
