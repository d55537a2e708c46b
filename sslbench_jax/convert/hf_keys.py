"""Hugging Face ``transformers`` checkpoints -> timm / torchvision names.

``model.safetensors`` / ``pytorch_model.bin`` of these classes (names read
from ``transformers/models/*/modeling_*.py`` and ``convert_*_to_hf.py``):

``Dinov2Model`` / ``Dinov2WithRegistersModel`` (``Dinov2ForImageClassification``: prefix ``dinov2.``)
  ``embeddings.{cls_token, mask_token, register_tokens, position_embeddings,
  patch_embeddings.projection}``, ``encoder.layer.N.{norm1, norm2,
  attention.attention.{query,key,value}, attention.output.dense,
  layer_scale1.lambda1, layer_scale2.lambda1, mlp.fc1, mlp.fc2}``,
  ``layernorm``.
``ViTModel`` / ``ViTMAEModel`` (``ViTForImageClassification``: ``vit.``; ``ViTMAEForPreTraining``: ``vit.`` + ``decoder.``)
  the same embeddings, ``encoder.layer.N.{layernorm_before, layernorm_after,
  attention.attention.{query,key,value}, attention.output.dense,
  intermediate.dense, output.dense}``, ``layernorm``, ``pooler.dense``.
``ResNetModel`` (``ResNetForImageClassification``: ``resnet.`` + ``classifier.1``)
  ``embedder.embedder.{convolution, normalization}``,
  ``encoder.stages.S.layers.B.{shortcut, layer.K}.{convolution, normalization}``.

``translate`` rewrites such a flattened checkpoint *before* the backbone is
located: the encoder's tensors move under a new root ``<prefix>hf_dinov2.``,
``hf_vit.`` or ``hf_resnet.`` with timm (ViT; q/k/v concatenated into
``qkv``) or torchvision (ResNet) names, so the family key maps take over
unchanged, and the root records the source. Pooler, classifier and decoder
tensors keep their names outside the root (reported as dropped). A tensor in
the encoder's namespace that has no translation (e.g. the SwiGLU MLP of
DINOv2-giant) is an error naming it.

``vit_source_options`` gives what the names cannot: HF's LayerNorm epsilon
(``layer_norm_eps``: 1e-12 for ViT/ViT-MAE, 1e-6 for DINOv2) and its
position-embedding resize (bicubic to the exact size, no antialias). The
ViT-MAE encoder masks 75 % of the patches in ``ViTMAEModel.forward``; the
converted backbone sees every patch, like MAE's own feature extraction.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from sslbench_jax.convert.errors import ConversionError

SUPPORTED_VIT_LAYOUTS = (
    "timm/DINO/MoCo v3/MAE/iBOT/DINOv2 (patch_embed.proj, blocks.N), "
    "MMSelfSup/MMPretrain (patch_embed.projection, layers.N), BEiT v2 "
    "(gamma_1, rel_pos_bias), Hugging Face Dinov2Model[WithRegisters]/ViTModel/"
    "ViTMAEModel (embeddings.patch_embeddings.projection, encoder.layer.N)")

_VIT_MARKER = "embeddings.patch_embeddings.projection.weight"
_RESNET_MARKER = "embedder.embedder.convolution.weight"
_LN_EPS = {"hf_dinov2.": 1e-6, "hf_vit.": 1e-12}

_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_VIT_LAYER = {
    "norm1": "norm1", "layernorm_before": "norm1",
    "norm2": "norm2", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "intermediate.dense": "mlp.fc1",
    "mlp.fc2": "mlp.fc2", "output.dense": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}
_QKV = ("query", "key", "value")
_RESNET = re.compile(
    r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d+))\."
    r"(convolution|normalization)\.(\w+)$")
_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(\w+)$")


def _roots(keys, marker: str) -> list[str]:
  return sorted({k[:-len(marker)] for k in keys if k.endswith(marker)
                 and (k == marker or k[:-len(marker)].endswith("."))})


def _vit_name(rel: str, kind: str) -> str | None:
  """timm name of one HF ViT/DINOv2 tensor (None: q/k/v, handled apart)."""
  if rel in _EMBEDDINGS:
    return _EMBEDDINGS[rel]
  m = _LAYER.match(rel)
  if m:
    i, module, param = m.groups()
    if module.startswith("attention.attention.") and module.split(".")[-1] in _QKV:
      return None
    target = _VIT_LAYER.get(module)
    if target is not None and (param == "lambda1") == target.startswith("ls"):
      return f"blocks.{i}.{target}." + ("gamma" if param == "lambda1" else param)
  raise ConversionError(
      f"Hugging Face {kind} tensor {rel!r} has no translation (layout guessed: "
      f"Hugging Face {kind}; supported: {SUPPORTED_VIT_LAYOUTS}; DINOv2's "
      "SwiGLU MLP (giant) is not supported)")


def _translate_vit(flat: dict[str, Any], root: str) -> dict[str, Any]:
  kind = ("Dinov2Model" if root + "encoder.layer.0.norm1.weight" in flat
          else "ViTModel/ViTMAEModel")
  new_root = root + ("hf_dinov2." if kind == "Dinov2Model" else "hf_vit.")
  out: dict[str, Any] = {}
  qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  for key, value in flat.items():
    rel = key[len(root):] if key.startswith(root) else None
    if rel is None or not rel.startswith(("embeddings.", "encoder.", "layernorm.")):
      out[key] = value  # pooler, classifier, decoder, other models' tensors
      continue
    name = _vit_name(rel, kind)
    if name is None:
      m = _LAYER.match(rel)
      qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2).split(".")[-1]] = value
      continue
    out[new_root + name] = value
  for (i, param), parts in sorted(qkv.items()):
    if set(parts) != set(_QKV):
      raise ConversionError(
          f"Hugging Face {kind} layer {i} has attention {param} for "
          f"{', '.join(sorted(parts))} only (needs query, key and value)")
    out[f"{new_root}blocks.{i}.attn.qkv.{param}"] = np.concatenate(
        [np.asarray(parts[p]) for p in _QKV], axis=0)
  return out


def _resnet_name(rel: str) -> str:
  m = _STEM.match(rel)
  if m:
    return ("conv1." if m.group(1) == "convolution" else "bn1.") + m.group(2)
  m = _RESNET.match(rel)
  if m:
    stage, block, where, k, kind, param = m.groups()
    base = f"layer{int(stage) + 1}.{block}."
    if where == "shortcut":
      module = "downsample.0" if kind == "convolution" else "downsample.1"
    else:
      module = ("conv" if kind == "convolution" else "bn") + str(int(k) + 1)
    return base + module + "." + param
  raise ConversionError(f"Hugging Face ResNetModel tensor {rel!r} has no "
                        "translation to torchvision names")


def _translate_resnet(flat: dict[str, Any], root: str) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in flat.items():
    rel = key[len(root):] if key.startswith(root) else None
    if rel is None or not rel.startswith(("embedder.", "encoder.")):
      out[key] = value
      continue
    out[root + "hf_resnet." + _resnet_name(rel)] = value
  return out


def translate(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Renames Hugging Face encoders in a flattened checkpoint (else unchanged).

  Args:
    flat: ``detect.flatten`` of the checkpoint (dotted keys -> arrays).

  Returns:
    The same tensors, HF encoders renamed under ``<prefix>hf_dinov2.`` /
    ``hf_vit.`` / ``hf_resnet.`` (see module docstring).

  Raises:
    ConversionError: an HF encoder tensor without a translation.
  """
  out = dict(flat)
  for root in _roots(list(out), _VIT_MARKER):
    out = _translate_vit(out, root)
  for root in _roots(list(out), _RESNET_MARKER):
    out = _translate_resnet(out, root)
  return out


def vit_source_options(root: str) -> dict[str, Any] | None:
  """ViT options of a translated HF root (None for any other root)."""
  for suffix, eps in _LN_EPS.items():
    if root.endswith(suffix):
      # HF interpolate_pos_encoding: bicubic to size=(h, w), no antialias.
      return {"ln_eps": eps, "pos_interp_offset": 0.0,
              "pos_interp_antialias": False}
  return None


def guess_vit_layout(keys) -> str:
  """A human name for the ViT naming scheme of root-relative ``keys``."""
  keys = list(keys)

  def has(pattern):
    return any(re.search(pattern, k) for k in keys)

  if has(r"patch_embeddings\.|^encoder\.layer\.|^layer\.\d+\."):
    return ("Hugging Face transformers naming of a model not supported here "
            "(keys like " + ", ".join(sorted(keys)[:3]) + ")")
  if has(r"^patch_embed\.projection\.|^layers\.\d+\."):
    return "MMSelfSup/MMPretrain"
  if has(r"rel_pos_bias|gamma_1$"):
    return "BEiT"
  if has(r"^patch_embed\.proj\.|^blocks\.\d+\."):
    return "timm-style (DINO/MoCo v3/MAE/iBOT/DINOv2)"
  return "unknown (keys like " + ", ".join(sorted(keys)[:3]) + ")"
