"""ResNet key map: torchvision-named PyTorch tensors -> ``backbones.resnet`` variables.

Implements the family protocol of ``convert/_family.py``. Every supported
source (torchvision, MoCo, SwAV/DeepCluster-v2/SeLa-v2, DINO, VISSL trunks,
MMSelfSup ``backbone.``, BYOL ports) already uses torchvision's names below its
root, so ``canonicalize`` only has to normalise rare spellings.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sslbench_jax.backbones import registry
from sslbench_jax.convert import _family
from sslbench_jax.convert.errors import ConversionError

MARKERS: tuple[str, ...] = ("layer1.0.conv1.weight",)
HEAD_PREFIXES: tuple[str, ...] = (
    "fc.", "head.", "heads.", "neck.", "projection_head.", "prototypes.",
    "predictor.", "projector.", "projection.", "classifier.", "data_preprocessor.",
)
# A torchvision ``fc`` this wide is a classifier (ImageNet-1k or larger); a
# narrower linear ``fc`` is an SSL projection (MoCo v1: 128) and is dropped
# unless the caller asks for ``num_classes`` explicitly.
_MIN_CLASSIFIER_OUTPUTS = 1000


def canonicalize(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps VISSL-style ``_feature_blocks.`` leftovers onto torchvision names."""
  return {k.removeprefix("_feature_blocks."): v for k, v in state.items()}


def _structure(state) -> tuple[str, tuple[int, ...], int]:
  """(block type, blocks per stage, width multiplier) read from the keys."""
  stages = []
  for i in range(1, 5):
    n = 0
    while f"layer{i}.{n}.conv1.weight" in state:
      n += 1
    stages.append(n)
  block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
  stem = state["conv1.weight"].shape[0] if "conv1.weight" in state else 64
  return block, tuple(stages), max(1, stem // 64)


def _arch_structure(arch: str) -> tuple[str, tuple[int, ...], int]:
  model = registry.create_model(arch)
  return model.block, tuple(model.stage_sizes), model.width_multiplier


def infer_options(state: dict[str, np.ndarray], arch: str) -> dict[str, Any]:
  """Checks the checkpoint is ``arch`` and infers ``num_classes`` from ``fc``.

  Raises:
    ConversionError: the tensors describe another ResNet (names the right arch).
  """
  found = _structure(state)
  if found != _arch_structure(arch):
    block, stages, width = found
    matches = [a for a in registry.ARCHS if registry.family(a) == "resnet"
               and _arch_structure(a) == found]
    hint = f"use arch={matches[0]}" if matches else "no registered ResNet matches"
    evidence = ("layer1.0.conv3.weight" if block == "bottleneck" else
                "no layer1.0.conv3.weight") + f", {sum(stages)} blocks layer1-4"
    if "conv1.weight" in state:
      evidence += f", conv1.weight {tuple(state['conv1.weight'].shape)}"
    raise ConversionError(
        f"checkpoint is a ResNet with {block} blocks {'-'.join(map(str, stages))} "
        f"and width x{width} ({evidence}), not {arch}: {hint}")
  fc = state.get("fc.weight")
  if fc is not None and fc.ndim == 2 and "fc.bias" in state and \
      fc.shape[0] >= _MIN_CLASSIFIER_OUTPUTS:
    return {"num_classes": int(fc.shape[0])}
  return {}


def _conv(state, key: str) -> dict[str, np.ndarray]:
  return {"kernel": _family.conv_kernel(state[key + ".weight"])}


def _bn(state, key: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  params = {"scale": state[key + ".weight"], "bias": state[key + ".bias"]}
  stats = {"mean": state[key + ".running_mean"], "var": state[key + ".running_var"]}
  return params, stats


def to_flax(state, arch: str, options: dict[str, Any]) -> dict[str, Any]:
  """Builds ``{"params", "batch_stats"}`` for ``registry.create_model(arch, **options)``."""
  block, stages, _ = _arch_structure(arch)
  params: dict[str, Any] = {"conv1": _conv(state, "conv1")}
  stats: dict[str, Any] = {}
  params["bn1"], stats["bn1"] = _bn(state, "bn1")
  n_convs = 3 if block == "bottleneck" else 2
  for i, n_blocks in enumerate(stages, start=1):
    for j in range(n_blocks):
      torch_prefix, name = f"layer{i}.{j}.", f"layer{i}_{j}"
      # (flax conv, torch conv, flax bn, torch bn) within the block
      pairs = [(f"conv{c}", f"conv{c}", f"bn{c}", f"bn{c}")
               for c in range(1, n_convs + 1)]
      if j == 0 and (i > 1 or block == "bottleneck"):  # as in backbones.resnet
        pairs.append(("downsample_conv", "downsample.0",
                      "downsample_bn", "downsample.1"))
      p, s = params.setdefault(name, {}), stats.setdefault(name, {})
      for flax_conv, torch_conv, flax_bn, torch_bn in pairs:
        p[flax_conv] = _conv(state, torch_prefix + torch_conv)
        p[flax_bn], s[flax_bn] = _bn(state, torch_prefix + torch_bn)
  if options.get("num_classes") is not None:
    params["fc"] = {"kernel": _family.dense_kernel(state["fc.weight"]),
                    "bias": state["fc.bias"]}
  return {"params": params, "batch_stats": stats}
