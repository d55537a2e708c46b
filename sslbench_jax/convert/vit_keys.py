"""Key map: ViT checkpoints (timm, DINO, MoCo v3, MAE, iBOT, MMSelfSup, BEiT v2, DINOv2) -> Flax.

Implements the family protocol of ``sslbench_jax.convert._family`` for
``backbones.vit.VisionTransformer``. ``canonicalize`` renames every source
naming onto timm's (root-relative keys)::

  MMSelfSup / MILAN       patch_embed.projection.*       -> patch_embed.proj.*
                          layers.N.ln1 / ln2             -> blocks.N.norm1 / norm2
                          layers.N.attn.qkv / attn.proj  -> blocks.N.attn.qkv / proj
                          layers.N.ffn.layers.0.0        -> blocks.N.mlp.fc1
                          layers.N.ffn.layers.1          -> blocks.N.mlp.fc2
                          layers.N.attn.gamma1.weight    -> blocks.N.ls1.gamma
                          layers.N.ffn.gamma2.weight     -> blocks.N.ls2.gamma
                          ln1 (final) / ln2 (avg pool)   -> norm / fc_norm
  BEiT v2                 blocks.N.gamma_1 / gamma_2     -> blocks.N.ls1.gamma / ls2.gamma
                          rel_pos_bias.* (shared)        -> blocks.N.attn.* (copied per block)
  DINOv2                  register_tokens                -> reg_token
                          blocks.C.N.* (block chunks)    -> blocks.N.*
  timm DINOv2-reg         pos_embed without a CLS row    -> zero CLS row prepended
                          (timm folds the CLS position into cls_token)

and then ``to_flax`` maps timm names onto the Flax tree: conv OIHW -> HWIO,
linear weights transposed, LayerNorm ``weight`` -> ``scale``; BEiT's
``q_bias``/``v_bias`` become a qkv bias whose key part is zero (a key bias
adds the same number to every logit of a query row, so softmax ignores it).
``relative_position_index`` buffers are read and checked against the index the
model computes, not copied.

``source_options`` adds what the key names cannot: how the source's own code
resizes the position embedding at another resolution (``pos_interp_rule``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sslbench_jax.backbones import registry
from sslbench_jax.backbones import vit
from sslbench_jax.convert import hf_keys
from sslbench_jax.convert._family import conv_kernel, dense_kernel, is_missing
from sslbench_jax.convert.errors import ConversionError

MARKERS: tuple[str, ...] = (
    "cls_token",
    "patch_embed.proj.weight",        # timm, DINO, MAE, BEiT, DINOv2, MoCo v3
    "patch_embed.projection.weight",  # MMSelfSup / MMPretrain
)

HEAD_PREFIXES: tuple[str, ...] = (
    "head.",          # DINO/iBOT projection head, MoCo v3 MLP, a classifier
    "head_drop.",
    "decoder_",       # MAE decoder (decoder_embed, decoder_blocks, ...)
    "mask_token",     # MAE, BEiT, DINOv2
    "masked_embed",   # iBOT
    "lm_head.",       # BEiT masked image modelling head
    "cls_pt_layers.",  # BEiT v2 patch-aggregation pretraining layers
    "predictor.",     # MoCo v3 predictor (when under the encoder root)
    "norm.",          # unread only with mean pooling and no fc_norm (BEiT v2, below)
)

# (pattern, replacement) applied in order with re.sub on each key.
_RENAMES: tuple[tuple[str, str], ...] = (
    # MMSelfSup / MMPretrain.
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attn\.gamma1\.weight$", r"blocks.\1.ls1.gamma"),
    (r"^layers\.(\d+)\.ffn\.gamma2\.weight$", r"blocks.\1.ls2.gamma"),
    (r"^layers\.(\d+)\.attn\.", r"blocks.\1.attn."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^ln1\.", "norm."),
    (r"^ln2\.", "fc_norm."),
    # BEiT.
    (r"^blocks\.(\d+)\.gamma_1$", r"blocks.\1.ls1.gamma"),
    (r"^blocks\.(\d+)\.gamma_2$", r"blocks.\1.ls2.gamma"),
    # DINOv2.
    (r"^register_tokens$", "reg_token"),
    (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),
)

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def canonicalize(state: Mapping[str, Any]) -> dict[str, Any]:
  """Renames root-relative keys of any supported source onto timm names.

  Args:
    state: root-relative key -> array.

  Returns:
    A new dict; unknown keys pass through unchanged.
  """
  out: dict[str, Any] = {}
  for key, value in state.items():
    for pattern, repl in _RENAMES:
      key = re.sub(pattern, repl, key)
    out[key] = value
  # BEiT's shared relative position bias: every block uses the same table.
  shared = {k[len("rel_pos_bias."):]: out.pop(k) for k in list(out)
            if k.startswith("rel_pos_bias.")}
  if shared:
    depth = _depth(out)
    for i in range(depth):
      for name, value in shared.items():
        out.setdefault(f"blocks.{i}.attn.{name}", value)
  # timm's DINOv2-with-registers layout (no_embed_class): pos_embed has no CLS
  # row and the CLS position is already added into cls_token.
  pos = out.get("pos_embed")
  if pos is not None and "cls_token" in out and np.ndim(pos) == 3:
    n = np.shape(pos)[1]
    if math.isqrt(n) ** 2 == n:
      pos = np.asarray(pos)
      out["pos_embed"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  return out


def _depth(state: Mapping[str, Any]) -> int:
  ids = {int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k))}
  return max(ids) + 1 if ids else 0


def _shape(state: Any, key: str) -> tuple[int, ...] | None:
  if key not in state:
    return None
  value = state.peek(key) if hasattr(state, "peek") else state[key]
  return tuple(np.shape(value))


def _arch_config(arch: str) -> vit.VisionTransformer:
  if registry.family(arch) != "vit":
    raise ConversionError(f"{arch!r} is not a ViT architecture")
  return registry.create_model(arch)


def _looks_like(state: Mapping[str, Any]) -> str:
  """Names the registry arch whose width/patch/depth the checkpoint has."""
  shape = _shape(state, "patch_embed.proj.weight")
  if shape is None or len(shape) != 4:
    return "an unknown ViT"
  depth = _depth(state)
  for arch in registry.ARCHS:
    if registry.family(arch) != "vit":
      continue
    m = registry.create_model(arch)
    if (m.width, m.patch_size, m.depth) == (shape[0], shape[2], depth):
      return arch
  return f"a ViT of width {shape[0]}, patch {shape[2]}, depth {depth}"


def infer_options(state: Mapping[str, Any], arch: str) -> dict[str, Any]:
  """Options of ``VisionTransformer`` implied by a canonical ViT state.

  Args:
    state: canonical (timm-named) root-relative state.
    arch: target registry architecture.

  Returns:
    ``num_registers``, ``layerscale``, ``pool``, ``rel_pos_bias``,
    ``img_size``, ``qkv_bias``, ``mlp_ratio`` and ``num_classes``.

  Raises:
    ConversionError: when the state cannot be this family's model.
  """
  model = _arch_config(arch)
  options: dict[str, Any] = {}
  patch_w = _shape(state, "patch_embed.proj.weight")
  patch = patch_w[2] if patch_w and len(patch_w) == 4 else model.patch_size
  options["num_registers"] = (_shape(state, "reg_token") or (0, 0))[1]
  # Only the LayerScale *init* value is a model option; the trained gamma is
  # loaded, so any non-None value (DINOv2's 1e-5) reproduces the network.
  options["layerscale"] = 1e-5 if "blocks.0.ls1.gamma" in state else None
  has_norm, has_fc_norm = "norm.weight" in state, "fc_norm.weight" in state
  if has_norm and has_fc_norm:
    raise ConversionError(
        "checkpoint has both a final `norm` and an `fc_norm` (norm before and "
        "after pooling); this ViT supports one of them")
  options["pool"] = "mean" if has_fc_norm else "cls"
  table = _shape(state, "blocks.0.attn.relative_position_bias_table")
  if table is not None and not has_fc_norm:
    # A BEiT (v2) pretraining checkpoint: the Closer-Look study's
    # representation is BEiT's fine-tuning model with use_mean_pooling, i.e.
    # a freshly initialised fc_norm of the mean patch token (see _mapping).
    options["pool"] = "mean"
  options["rel_pos_bias"] = table is not None
  pos = _shape(state, "pos_embed")
  if table is not None:
    if pos is not None:
      raise ConversionError(
          "checkpoint has both an absolute pos_embed and a relative position "
          "bias; this ViT supports one of them")
    grid = (math.isqrt(table[0] - 3) + 1) // 2
    options["img_size"] = grid * patch
  elif pos is not None:
    options["img_size"] = math.isqrt(pos[1] - 1) * patch
  options["qkv_bias"] = ("blocks.0.attn.qkv.bias" in state
                         or "blocks.0.attn.q_bias" in state)
  fc1 = _shape(state, "blocks.0.mlp.fc1.weight")
  if fc1 is not None and patch_w is not None:
    options["mlp_ratio"] = fc1[0] / patch_w[0]
  head = _shape(state, "head.weight")
  options["num_classes"] = (head[0] if head is not None and len(head) == 2
                            and patch_w is not None and head[1] == patch_w[0]
                            else 0)
  return options


# How each source resizes its absolute position embedding to another grid
# (backbones/vit.py module docstring), as ``VisionTransformer`` options:
POS_INTERP_RULES: dict[str, dict[str, Any]] = {
    # DINO / iBOT / DINOv2 ``interpolate_pos_encoding``: bicubic with
    # ``scale_factor=(new + 0.1) / old``.
    "dino_offset": {"pos_interp_offset": 0.1, "pos_interp_antialias": False},
    # MAE ``interpolate_pos_embed``, BEiT fine-tuning, MMPretrain
    # ``resize_pos_embed``: bicubic ``size=new``, align_corners=False.
    "exact_size": {"pos_interp_offset": 0.0, "pos_interp_antialias": False},
    # timm ``resample_abs_pos_embed`` (``antialias=True`` by default) and
    # DINOv2 with registers (hub: ``interpolate_offset=0``,
    # ``interpolate_antialias=True``).
    "exact_size_antialias": {"pos_interp_offset": 0.0,
                             "pos_interp_antialias": True},
}

_DINOV2_CHUNK_RE = re.compile(r"^blocks\.\d+\.\d+\.")


def pos_interp_rule(state: Mapping[str, Any], root: str, source: str,
                    source_format: str) -> tuple[str, str]:
  """Which ``POS_INTERP_RULES`` entry the checkpoint's own code applies.

  Decided from the layout before canonicalisation: names only one source
  uses come first, then wrappers, then the file format.

  Args:
    state: root-relative tensors as stored (not canonicalised).
    root: the backbone's prefix in the file.
    source: ``detect.describe_source`` of that root.
    source_format: ``readers.read_checkpoint``'s format name.

  Returns:
    ``(rule, reason)``; ``reason`` says which evidence decided.
  """
  keys = set(state)
  pos = state.get("pos_embed")
  mask = state.get("mask_token")
  if "patch_embed.projection.weight" in keys:
    return "exact_size", "MMSelfSup/MMPretrain names (resize_pos_embed, size=)"
  if "register_tokens" in keys:
    return ("exact_size_antialias", "DINOv2 with registers (hub *_reg: "
            "interpolate_offset=0, interpolate_antialias=True)")
  if "reg_token" in keys or (
      pos is not None and np.ndim(pos) == 3
      and math.isqrt(np.shape(pos)[1]) ** 2 == np.shape(pos)[1]):
    return ("exact_size_antialias", "timm layout (reg_token / pos_embed "
            "without a CLS row): resample_abs_pos_embed, antialias=True")
  if source == "dino":
    return "dino_offset", "teacher/student checkpoint (DINO, iBOT, DINOv2 code)"
  if "masked_embed" in keys:
    return "dino_offset", "iBOT masked_embed (DINO's interpolate_pos_encoding)"
  if (mask is not None and np.ndim(mask) == 2) or any(
      _DINOV2_CHUNK_RE.match(k) for k in keys):
    return "dino_offset", "DINOv2 layout (2-D mask_token / block chunks)"
  if any(k.startswith("decoder_") for k in keys):
    return "exact_size", "MAE decoder keys (interpolate_pos_embed, size=)"
  if any(k.startswith("rel_pos_bias.") or "relative_position_bias_table" in k
         or k.endswith("attn.q_bias") for k in keys):
    return "exact_size", "BEiT layout (fine-tuning resizes with size=)"
  if source_format == "safetensors":
    return ("exact_size_antialias", "safetensors file (timm / Hugging Face "
            "hub): resample_abs_pos_embed, antialias=True")
  if source == "moco_v3":
    # MoCo v3's ViT is timm's class and its code never resizes; timm's
    # resample is the only resize that code base offers.
    return ("exact_size_antialias",
            "MoCo v3 (a timm VisionTransformer): timm's resample_abs_pos_embed")
  if root == "model.":
    return "exact_size", "{'model': ...} wrapper (MAE / DeiT / BEiT releases, size=)"
  # A bare timm-named state dict: DINO's backbone-only releases look like
  # this (and so does a timm .pth); keep DINO's rule, the historic default.
  return ("dino_offset", "plain timm-named state dict, assumed a DINO "
          "backbone release; pass options to override")


def source_options(state: Mapping[str, Any], root: str, source: str,
                   source_format: str) -> dict[str, Any]:
  """Options implied by the source rather than by tensor shapes.

  Args: as ``pos_interp_rule``'s.

  Returns:
    ``pos_interp_offset`` and ``pos_interp_antialias`` of the source's rule.
  """
  hf = hf_keys.vit_source_options(root)
  if hf is not None:
    logging.info("Hugging Face transformers ViT: options %s", hf)
    return hf
  rule, reason = pos_interp_rule(state, root, source, source_format)
  logging.info("position-embedding resize rule %s %s: %s", rule,
               POS_INTERP_RULES[rule], reason)
  return dict(POS_INTERP_RULES[rule])


def example_image_size(arch: str, options: Mapping[str, Any]) -> int:
  """Input size for ``jax.eval_shape(model.init)``: the pretraining size.

  Args:
    arch: registry ViT architecture.
    options: its options.

  Returns:
    ``img_size`` of ``create_model(arch, **options)``.
  """
  return int(registry.create_model(arch, **options).img_size)


def _expected_shapes(arch: str, options: Mapping[str, Any]
                     ) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened ``{path: shape}`` of ``jax.eval_shape(model.init)``."""
  model = registry.create_model(arch, **options)
  size = example_image_size(arch, options)
  tree = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, size, size, 3), jnp.float32))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _mapping(state: Any, model: vit.VisionTransformer) -> list[tuple[tuple[str, ...], str, Any]]:
  """(flax path, source key, converted value) for every leaf the model has."""
  out = []

  def read(key):
    try:
      return state[key]
    except (KeyError, ConversionError):  # collected and reported together
      return _ABSENT

  def put(path, key, fn=lambda x: x):
    value = read(key)
    out.append((("params",) + path, key, value if value is _ABSENT else fn(value)))

  def linear(path, key):
    put(path + ("kernel",), key + ".weight", dense_kernel)
    put(path + ("bias",), key + ".bias")

  def layer_norm(path, key):
    put(path + ("scale",), key + ".weight")
    put(path + ("bias",), key + ".bias")

  put(("patch_embed", "kernel"), "patch_embed.proj.weight", conv_kernel)
  put(("patch_embed", "bias"), "patch_embed.proj.bias")
  put(("cls_token",), "cls_token")
  if model.num_registers:
    put(("reg_token",), "reg_token")
  if not model.rel_pos_bias:
    put(("pos_embed",), "pos_embed")
  for i in range(model.depth):
    src, dst = f"blocks.{i}.", (f"blocks_{i}",)
    layer_norm(dst + ("norm1",), src + "norm1")
    qkv = dst + ("attn", "qkv")
    put(qkv + ("kernel",), src + "attn.qkv.weight", dense_kernel)
    if model.qkv_bias:
      if src + "attn.q_bias" in state:
        q, v = read(src + "attn.q_bias"), read(src + "attn.v_bias")
        if q is _ABSENT or v is _ABSENT:
          bias = _ABSENT
        elif is_missing(q) or is_missing(v):
          bias = q if is_missing(q) else v
        else:
          bias = np.concatenate([q, np.zeros_like(q), v])
        out.append((("params",) + qkv + ("bias",), src + "attn.q_bias/v_bias", bias))
      else:
        put(qkv + ("bias",), src + "attn.qkv.bias")
    linear(dst + ("attn", "proj"), src + "attn.proj")
    if model.rel_pos_bias:
      put(dst + ("attn", "relative_position_bias_table"),
          src + "attn.relative_position_bias_table")
    if model.layerscale is not None:
      put(dst + ("ls1", "gamma"), src + "ls1.gamma")
      put(dst + ("ls2", "gamma"), src + "ls2.gamma")
    layer_norm(dst + ("norm2",), src + "norm2")
    linear(dst + ("mlp", "fc1"), src + "mlp.fc1")
    linear(dst + ("mlp", "fc2"), src + "mlp.fc2")
  if model.pool == "mean" and "fc_norm.weight" not in state and "norm.weight" in state:
    # Mean pooling of a checkpoint without fc_norm (BEiT v2 pretraining): as
    # BEiT's fine-tuning model loads it (use_mean_pooling=True), `norm` becomes
    # Identity and fc_norm keeps its init (scale 1, bias 0); the checkpoint's
    # norm.* (applied before pooling in pretraining) is dropped. docs/convert.md.
    logging.warning("mean pooling without fc_norm in the checkpoint: fc_norm = "
                    "LayerNorm(scale 1, bias 0) as BEiT's use_mean_pooling "
                    "model; the checkpoint's norm.* is dropped")
    out.append((("params", "fc_norm", "scale"), "fc_norm.weight (BEiT init)",
                np.ones(model.width, np.float32)))
    out.append((("params", "fc_norm", "bias"), "fc_norm.bias (BEiT init)",
                np.zeros(model.width, np.float32)))
  else:
    layer_norm(("fc_norm" if model.pool == "mean" else "norm",),
               "fc_norm" if model.pool == "mean" else "norm")
  if model.num_classes:
    linear(("head",), "head")
  return out


def _check_rel_pos_index(state: Any, model: vit.VisionTransformer) -> None:
  """Reads the checkpoint's BEiT index buffers; they must equal ours."""
  grid = model.img_size // model.patch_size
  ours = vit.relative_position_index(grid, grid)
  for i in range(model.depth):
    key = f"blocks.{i}.attn.relative_position_index"
    if key in state:
      theirs = np.asarray(state[key])
      if theirs.shape != ours.shape or not np.array_equal(theirs, ours):
        raise ConversionError(
            f"{key} does not match BEiT's index for a {grid}x{grid} grid "
            f"(shape {theirs.shape}); is img_size right?")


def to_flax(state: Any, arch: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """Canonical ViT state -> Flax variables of ``create_model(arch, **options)``.

  Args:
    state: a ``SourceState`` (or plain mapping) of canonical timm keys.
    arch: registry ViT architecture.
    options: ``VisionTransformer`` options (usually ``infer_options`` merged
      with the user's).

  Returns:
    ``{"params": {...}}`` of float32 NumPy arrays (``MISSING`` where the
    user allowed a tensor to be missing).

  Raises:
    ConversionError: naming every mis-shaped, missing and unexpected tensor.
  """
  _arch_config(arch)
  model = registry.create_model(arch, **options)
  expected = _expected_shapes(arch, options)
  problems, missing = [], []
  variables: dict[str, Any] = {}
  produced = set()
  for path, key, value in _mapping(state, model):
    produced.add(path)
    if value is _ABSENT:
      missing.append(key)
      continue
    if not is_missing(value):
      value = np.asarray(value, np.float32)
      want = expected.get(path)
      if want is not None and tuple(value.shape) != want:
        problems.append((key, _torch_shape(key, value.shape),
                         _torch_shape(key, want)))
    node = variables
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  extra_blocks = sorted({int(m.group(1)) for k in state
                         if (m := _BLOCK_RE.match(k))
                         and int(m.group(1)) >= model.depth})
  not_built = sorted("/".join(p) for p in set(expected) - produced)
  if problems or missing or extra_blocks or not_built:
    parts = []
    if problems:
      parts.append("mis-shaped: " + "; ".join(_grouped(problems)))
    if missing:
      parts.append("missing: " + ", ".join(_grouped([(k,) for k in missing])))
    if extra_blocks:
      parts.append(f"unexpected blocks beyond depth {model.depth}: "
                   + ", ".join(f"blocks.{i}.*" for i in extra_blocks))
    if not_built:
      parts.append("not built: " + ", ".join(not_built))
    like = _looks_like(state)
    hint = f"{like}; convert with arch={like}" if like in registry.ARCHS else like
    raise ConversionError(
        f"checkpoint does not fit {arch} (it looks like {hint}; layout guessed: "
        f"{hf_keys.guess_vit_layout(state.keys())}; supported: "
        f"{hf_keys.SUPPORTED_VIT_LAYOUTS}): " + " | ".join(parts))
  if model.rel_pos_bias:
    _check_rel_pos_index(state, model)
  return variables


def _torch_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """A Flax leaf shape in the source's layout (undoes conv/linear transposes)."""
  shape = tuple(shape)
  if len(shape) == 4:
    return shape[3], shape[2], shape[0], shape[1]
  if len(shape) == 2 and key.endswith(".weight"):
    return shape[::-1]
  return shape


def _grouped(items: list[tuple]) -> list[str]:
  """Collapses keys that differ only in the block index: ``blocks.{0-11}.x``.

  Every key stays named, and a whole-model mismatch stays one readable line.
  """
  groups: dict[tuple, list[int]] = {}
  for key, *shapes in items:
    m = _BLOCK_RE.match(key)
    pattern = "blocks.{}." + key[m.end():] if m else key
    groups.setdefault((pattern, *map(tuple, shapes)), []).append(
        int(m.group(1)) if m else -1)
  out = []
  for (pattern, *shapes), ids in groups.items():
    ids = sorted(ids)
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 1:
      span = f"{ids[0]}-{ids[-1]}"
    else:
      span = ",".join(map(str, ids))
    text = pattern.replace("{}", "{" + span + "}" if len(ids) > 1 else span)
    if shapes:
      text += f" {shapes[0]} vs expected {shapes[1]}"
    out.append(text)
  return out


class _AbsentType:
  def __repr__(self) -> str:
    return "ABSENT"


_ABSENT = _AbsentType()
