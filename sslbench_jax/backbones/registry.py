"""Architecture names -> Flax modules.

Every backbone is called as ``model.apply(variables, images, train=False)`` on
NHWC float32 images (already normalised) and returns a dict of named
representations. ``"pre_logits"`` is always present: the representation the
studies probe (ResNet: global average pool; ViT: CLS after the final norm, or
fc_norm(mean patch token) for mean-pool heads; EfficientNet-Lite0: pooled head
features). Backbones with a classifier also return ``"logits"``. Intermediate
representations for layer-wise probes: ResNet ``"layer3_avg"``,
EfficientNet-Lite0 ``"stage1_avg"`` .. ``"stage7_avg"`` (pooled block-stage
outputs). Random weights for any arch: ``backbones/random_init.py``.
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn

# name -> (module, class name, constructor kwargs, default preprocessing preset)
_ARCHS: dict[str, tuple[str, str, dict[str, Any], str]] = {}


def _resnet(stage_sizes, block, width=1):
  return ("sslbench_jax.backbones.resnet", "ResNet",
          dict(stage_sizes=stage_sizes, block=block, width_multiplier=width),
          "imagenet_bilinear")


def _vit(patch, width, depth, heads):
  return ("sslbench_jax.backbones.vit", "VisionTransformer",
          dict(patch_size=patch, width=width, depth=depth, num_heads=heads),
          "imagenet_bicubic")


_ARCHS.update({
    "resnet18": _resnet((2, 2, 2, 2), "basic"),
    "resnet34": _resnet((3, 4, 6, 3), "basic"),
    "resnet50": _resnet((3, 4, 6, 3), "bottleneck"),
    "resnet101": _resnet((3, 4, 23, 3), "bottleneck"),
    "resnet152": _resnet((3, 8, 36, 3), "bottleneck"),
    "resnet50x2": _resnet((3, 4, 6, 3), "bottleneck", 2),
    "resnet50x4": _resnet((3, 4, 6, 3), "bottleneck", 4),
    "vit_small_patch16": _vit(16, 384, 12, 6),
    "vit_base_patch16": _vit(16, 768, 12, 12),
    "vit_large_patch16": _vit(16, 1024, 24, 16),
    "vit_small_patch14": _vit(14, 384, 12, 6),
    "vit_base_patch14": _vit(14, 768, 12, 12),
    "vit_large_patch14": _vit(14, 1024, 24, 16),
    "efficientnet_lite0": ("sslbench_jax.backbones.efficientnet",
                           "EfficientNetLite0", {}, "efficientnet_lite"),
})

ARCHS: tuple[str, ...] = tuple(_ARCHS)


def _entry(arch: str):
  if arch not in _ARCHS:
    raise ValueError(f"Unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
  return _ARCHS[arch]


def family(arch: str) -> str:
  """Returns "resnet", "vit" or "efficientnet"."""
  return _entry(arch)[0].rsplit(".", 1)[-1]


def default_preprocessing(arch: str) -> str:
  """Name of the preprocessing preset the arch's checkpoints expect."""
  return _entry(arch)[3]


def create_model(arch: str, **options: Any) -> nn.Module:
  """Builds the Flax module for ``arch``; ``options`` override its defaults.

  Args:
    arch: one of ``ARCHS``.
    **options: family-specific options (e.g. ``num_classes`` for ResNet,
      ``pool="mean"``, ``layerscale=1e-5`` (init value), ``num_registers=4`` for ViT).

  Returns:
    An unbound ``flax.linen.Module``.
  """
  module_name, cls_name, kwargs, _ = _entry(arch)
  cls = getattr(importlib.import_module(module_name), cls_name)
  return cls(**{**kwargs, **options})
