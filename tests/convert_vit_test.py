"""Every ViT source naming, written to disk and converted end-to-end.

Each case builds the timm-named PyTorch reference (tests/torch_vit.py) with
random weights, renames/wraps its state dict the way that source's release
does (hand-written here, independently of ``vit_keys``), saves it with
``torch.save``, converts it with ``convert_checkpoint`` and checks the Flax
outputs against the PyTorch model on the same images. The images are smaller
than the pretraining size, and each reference model resizes its position
embedding as that source's code does (tests/torch_vit.py), so the resize
rule the converter records from the layout is checked end to end.
"""

import logging

import numpy as np
import pytest
import safetensors.torch
import torch

import torch_vit
from sslbench_jax.backbones import registry
from sslbench_jax.backbones import weights
from sslbench_jax.convert import ConversionError, convert_checkpoint
from sslbench_jax.convert import vit_keys

TOL = 1e-4
DEPTH = 2


def _model(arch="vit_small_patch16", seed=0, depth=DEPTH, **options):
  m = registry.create_model(arch)
  return torch_vit.VisionTransformer(
      patch_size=m.patch_size, width=m.width, depth=depth,
      num_heads=m.num_heads, **options).randomize_(seed).eval()


def _sd(model):
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _prefixed(sd, prefix):
  return {prefix + k: v for k, v in sd.items()}


def _rename(sd, rules):
  """Applies (old substring at start-of-part, new) renames in order."""
  out = {}
  for k, v in sd.items():
    for old, new in rules:
      k = k.replace(old, new)
    out[k] = v
  return out


DINO = torch_vit.dino_interpolate_pos_encoding
MAE = torch_vit.mae_interpolate_pos_embed
TIMM = torch_vit.timm_resample_abs_pos_embed


def _junk(shape, seed=9):
  return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- sources -----------------------------------------------------------------

def _timm_plain():
  # A bare timm-named .pth is DINO's backbone-only release as much as timm's:
  # the converter keeps DINO's rule for it (options override).
  model = _model(pos_resize=DINO)
  return _sd(model), model, {}


def _timm_safetensors():
  # timm's Hugging Face hub weights are safetensors files.
  model = _model(pos_resize=TIMM)
  return _sd(model), model, {"save_as": "safetensors"}


def _dino_full():
  teacher, student = _model(seed=0, pos_resize=DINO), _model(seed=1)
  head = {"head.mlp.0.weight": _junk((32, 384)), "head.mlp.0.bias": _junk((32,)),
          "head.last_layer.weight_g": _junk((64, 1)),
          "head.last_layer.weight_v": _junk((64, 32))}
  ckpt = {"teacher": {**_prefixed(_sd(teacher), "backbone."), **head},
          "student": {**_prefixed(_sd(student), "module.backbone."),
                      **_prefixed(head, "module.")},
          "epoch": 100, "optimizer": {"state": {}}}
  return ckpt, teacher, {}


def _moco_v3():
  base, momentum = _model(seed=0, pos_resize=TIMM), _model(seed=1)
  mlp = {"head.0.weight": _junk((32, 384)), "head.1.weight": _junk((32,)),
         "head.1.bias": _junk((32,)), "head.3.weight": _junk((16, 32))}
  state = {**_prefixed({**_sd(base), **mlp}, "module.base_encoder."),
           **_prefixed({**_sd(momentum), **mlp}, "module.momentum_encoder."),
           "module.predictor.0.weight": _junk((16, 16))}
  return {"state_dict": state, "epoch": 300, "arch": "vit_small"}, base, {
      "select": "base_encoder"}


def _mae_global_pool():
  model = _model("vit_base_patch16", pool="mean", pos_resize=MAE)
  decoder = {"mask_token": _junk((1, 1, 64)), "decoder_embed.weight": _junk((64, 768)),
             "decoder_pos_embed": _junk((1, 197, 64)),
             "decoder_blocks.0.norm1.weight": _junk((64,)),
             "decoder_norm.weight": _junk((64,)),
             "decoder_pred.weight": _junk((768, 64))}
  return {"model": {**_sd(model), **decoder}}, model, {"arch": "vit_base_patch16"}


def _ibot():
  model = _model(pos_resize=DINO)
  state = {**_prefixed(_sd(model), "backbone."),
           "backbone.masked_embed": _junk((1, 384)),
           "head.mlp.0.weight": _junk((32, 384)),
           "head.last_layer2.weight": _junk((64, 32))}
  return {"state_dict": state}, model, {}


_MM_RULES = [("patch_embed.proj.", "patch_embed.projection."),
             ("blocks.", "layers."), (".norm1.", ".ln1."), (".norm2.", ".ln2."),
             (".mlp.fc1.", ".ffn.layers.0.0."), (".mlp.fc2.", ".ffn.layers.1."),
             (".ls1.gamma", ".attn.gamma1.weight"),
             (".ls2.gamma", ".ffn.gamma2.weight")]


def _mm_top_level(sd, final, pooled):
  out = {}
  for k, v in sd.items():
    if k.startswith("norm."):
      k = final + k[len("norm"):]
    elif k.startswith("fc_norm."):
      k = pooled + k[len("fc_norm"):]
    out[k] = v
  return out


def _milan_mmselfsup():
  model = _model(pos_resize=MAE)
  backbone = _mm_top_level(_rename(_sd(model), _MM_RULES), "ln1", "ln2")
  state = {**_prefixed(backbone, "backbone."),
           "neck.mask_token": _junk((1, 1, 64)),
           "neck.decoder_embed.weight": _junk((64, 384)),
           "target_generator.tokenizer.visual.conv1.weight": _junk((8, 3, 4, 4))}
  return {"meta": {"epoch": 400}, "state_dict": state}, model, {}


def _mmpretrain_layerscale_avgpool():
  model = _model(pool="mean", layerscale=0.1, pos_resize=MAE)
  backbone = _mm_top_level(_rename(_sd(model), _MM_RULES), "ln1", "ln2")
  return {"state_dict": _prefixed(backbone, "backbone.")}, model, {}


def _beit_v2():
  model = _model(rel_pos_bias=True, pool="mean", layerscale=0.1)
  sd = _rename(_sd(model), [(".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2")])
  sd["head.weight"], sd["head.bias"] = _junk((10, 384), 3), _junk((10,), 4)
  return {"model": sd}, model, {}


def _beit_v2_shared_rel_pos():
  model = _model(rel_pos_bias=True, pool="mean", layerscale=0.1)
  blocks = model.blocks
  with torch.no_grad():  # one table for every block, as BEiT pretraining has
    blocks[1].attn.relative_position_bias_table.copy_(
        blocks[0].attn.relative_position_bias_table)
  sd = _rename(_sd(model), [(".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2")])
  for i in range(DEPTH):
    table = sd.pop(f"blocks.{i}.attn.relative_position_bias_table")
    index = sd.pop(f"blocks.{i}.attn.relative_position_index")
  sd["rel_pos_bias.relative_position_bias_table"] = table
  sd["rel_pos_bias.relative_position_index"] = index
  sd["lm_head.weight"], sd["mask_token"] = _junk((32, 384)), _junk((1, 1, 384))
  return {"model": sd}, model, {}


def _dinov2_registers():
  model = _model("vit_small_patch14", num_registers=4, layerscale=1e-5,
                 img_size=518, pos_resize=TIMM)
  sd = _rename(_sd(model), [("reg_token", "register_tokens")])
  sd["mask_token"] = _junk((1, 384))
  return sd, model, {"arch": "vit_small_patch14"}


def _dinov2_block_chunks():
  model = _model("vit_small_patch14", layerscale=1e-5, img_size=518,
                 pos_resize=DINO)
  sd = _rename(_sd(model), [("blocks.", "blocks.0.")])
  return sd, model, {"arch": "vit_small_patch14"}


def _timm_dinov2_reg_no_embed_class():
  # timm stores DINOv2-reg with the CLS position folded into cls_token.
  model = _model("vit_small_patch14", num_registers=4, layerscale=1e-5,
                 img_size=518, pos_resize=TIMM)
  sd = _sd(model)
  sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
  sd["pos_embed"] = sd["pos_embed"][:, 1:]
  return sd, model, {"arch": "vit_small_patch14"}


SOURCES = {
    "timm_plain": _timm_plain, "timm_safetensors": _timm_safetensors,
    "dino_full": _dino_full, "moco_v3": _moco_v3,
    "mae_global_pool": _mae_global_pool, "ibot": _ibot,
    "milan_mmselfsup": _milan_mmselfsup,
    "mmpretrain_layerscale_avgpool": _mmpretrain_layerscale_avgpool,
    "beit_v2": _beit_v2, "beit_v2_shared_rel_pos": _beit_v2_shared_rel_pos,
    "dinov2_registers": _dinov2_registers,
    "dinov2_block_chunks": _dinov2_block_chunks,
    "timm_dinov2_reg": _timm_dinov2_reg_no_embed_class,
}

# The position-embedding resize each source's code applies (the reference
# models above resize the same way).
EXPECTED_RULE = {
    "timm_plain": "dino_offset", "timm_safetensors": "exact_size_antialias",
    "dino_full": "dino_offset", "moco_v3": "exact_size_antialias",
    "mae_global_pool": "exact_size", "ibot": "dino_offset",
    "milan_mmselfsup": "exact_size",
    "mmpretrain_layerscale_avgpool": "exact_size",
    "beit_v2": "exact_size", "beit_v2_shared_rel_pos": "exact_size",
    "dinov2_registers": "exact_size_antialias",
    "dinov2_block_chunks": "dino_offset",
    "timm_dinov2_reg": "exact_size_antialias",
}


def _save(tmp_path, ckpt, name="ckpt.pth", save_as="pth"):
  path = str(tmp_path / name)
  if save_as == "safetensors":
    path = str(tmp_path / "model.safetensors")
    safetensors.torch.save_file(ckpt, path)
  else:
    torch.save(ckpt, path)
  return path


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_source_converts_and_matches_torch(source, tmp_path):
  ckpt, model, kw = SOURCES[source]()
  arch = kw.pop("arch", "vit_small_patch16")
  path = _save(tmp_path, ckpt, save_as=kw.pop("save_as", "pth"))
  out_path = str(tmp_path / "vit.npz")
  variables, meta = convert_checkpoint(path, arch, out_path,
                                       options={"depth": DEPTH}, **kw)
  rule = vit_keys.POS_INTERP_RULES[EXPECTED_RULE[source]]
  _, sidecar = weights.load_variables(out_path)
  for key, value in rule.items():
    assert sidecar["arch_options"][key] == value, (source, key)
  flax_model = registry.create_model(arch, **meta["arch_options"])
  size = 28 if arch.endswith("14") else 32
  images = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
  out = flax_model.apply(variables, images, train=False)
  with torch.no_grad():
    ref = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  for key in ("pre_logits", "last4_cls", "patch_mean", "cls"):
    np.testing.assert_allclose(np.asarray(out[key]), ref[key].numpy(),
                               atol=TOL, rtol=0, err_msg=f"{source}: {key}")
  if "logits" in out:  # BEiT v2 fine-tuned: the classifier is kept
    head_w, head_b = ckpt["model"]["head.weight"], ckpt["model"]["head.bias"]
    want = ref["pre_logits"] @ head_w.T + head_b
    np.testing.assert_allclose(np.asarray(out["logits"]), want.numpy(),
                               atol=TOL, rtol=0)
  assert ("logits" in out) == (source == "beit_v2")


def test_caller_options_override_the_inferred_rule(tmp_path, caplog):
  # A DINO checkpoint converted for timm's resize: the caller wins, the log
  # names the detected rule and the override.
  ckpt, _, _ = _dino_full()
  model = _model(seed=0, pos_resize=TIMM)
  override = vit_keys.POS_INTERP_RULES["exact_size_antialias"]
  with caplog.at_level(logging.INFO, logger="absl"):
    variables, meta = convert_checkpoint(
        _save(tmp_path, ckpt), "vit_small_patch16",
        options={"depth": DEPTH, **override})
  assert {k: meta["arch_options"][k] for k in override} == override
  assert "rule dino_offset" in caplog.text
  assert "pos_interp_antialias=True overrides the inferred False" in caplog.text
  images = np.random.default_rng(1).normal(size=(2, 48, 32, 3)).astype(np.float32)
  out = registry.create_model("vit_small_patch16", **meta["arch_options"]).apply(
      variables, images, train=False)
  with torch.no_grad():
    ref = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  np.testing.assert_allclose(np.asarray(out["pre_logits"]),
                             ref["pre_logits"].numpy(), atol=TOL, rtol=0)


def test_inferred_options_and_dropped_keys(tmp_path):
  ckpt, _, _ = _mae_global_pool()
  _, meta = convert_checkpoint(_save(tmp_path, ckpt), "vit_base_patch16",
                               options={"depth": DEPTH})
  opts = meta["arch_options"]
  assert (opts["pool"], opts["img_size"], opts["num_registers"]) == ("mean", 224, 0)
  assert opts["layerscale"] is None and not opts["rel_pos_bias"]
  assert {"model.decoder_embed.weight", "model.mask_token",
          "model.decoder_pos_embed"} <= set(meta["dropped_keys"])
  ckpt, _, _ = _dinov2_registers()
  _, meta = convert_checkpoint(_save(tmp_path, ckpt), "vit_small_patch14",
                               options={"depth": DEPTH})
  opts = meta["arch_options"]
  assert (opts["num_registers"], opts["img_size"]) == (4, 518)
  assert opts["layerscale"] is not None and meta["dropped_keys"] == ["mask_token"]


def test_moco_v3_needs_explicit_select(tmp_path):
  ckpt, _, _ = _moco_v3()
  with pytest.raises(ConversionError, match="select"):
    convert_checkpoint(_save(tmp_path, ckpt), "vit_small_patch16",
                       options={"depth": DEPTH})


def test_vit_base_as_vit_small_names_misshaped_keys(tmp_path):
  sd = _sd(_model("vit_base_patch16"))
  with pytest.raises(ConversionError) as err:
    convert_checkpoint(_save(tmp_path, sd), "vit_small_patch16",
                       options={"depth": DEPTH})
  msg = str(err.value)
  assert "mis-shaped" in msg and "width 768" in msg
  for key in ("patch_embed.proj.weight (768, 3, 16, 16) vs expected (384, 3, 16, 16)",
              "cls_token (1, 1, 768)", "pos_embed", "norm.weight",
              "blocks.{0-1}.attn.qkv.weight (2304, 768) vs expected (1152, 384)"):
    assert key in msg, key


def test_full_vit_base_as_vit_small_names_the_arch():
  # Shapes only (meta device): the full 12-block ViT-B/16 costs no memory.
  with torch.device("meta"):
    model = torch_vit.VisionTransformer(16, 768, 12, 12)
  state = {k: np.broadcast_to(np.float32(0), v.shape)
           for k, v in model.state_dict().items()}
  state = vit_keys.canonicalize(state)
  options = vit_keys.infer_options(state, "vit_small_patch16")
  with pytest.raises(ConversionError) as err:
    vit_keys.to_flax(state, "vit_small_patch16", options)
  msg = str(err.value)
  assert "convert with arch=vit_base_patch16" in msg
  assert "blocks.{0-11}.mlp.fc2.weight (768, 3072) vs expected (384, 1536)" in msg


def test_extra_blocks_are_named(tmp_path):
  # A 3-block checkpoint converted as a 2-block model: the extra block is named.
  sd = _sd(_model(depth=3))
  with pytest.raises(ConversionError, match=r"unexpected .*blocks\.2\.\*"):
    convert_checkpoint(_save(tmp_path, sd), "vit_small_patch16",
                       options={"depth": DEPTH})


def test_missing_tensor_is_named(tmp_path):
  sd = _sd(_model())
  del sd["blocks.1.mlp.fc2.weight"], sd["blocks.0.norm2.bias"]
  with pytest.raises(ConversionError,
                     match=r"missing: .*blocks\.0\.norm2\.bias.*blocks\.1\.mlp\.fc2\.weight"):
    convert_checkpoint(_save(tmp_path, sd), "vit_small_patch16",
                       options={"depth": DEPTH})


def test_wrong_relative_position_index_is_rejected(tmp_path):
  ckpt, _, _ = _beit_v2()
  ckpt["model"]["blocks.0.attn.relative_position_index"] = torch.flip(
      ckpt["model"]["blocks.0.attn.relative_position_index"], (0,))
  with pytest.raises(ConversionError, match="relative_position_index"):
    convert_checkpoint(_save(tmp_path, ckpt), "vit_small_patch16",
                       options={"depth": DEPTH})
