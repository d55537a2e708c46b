"""The trained classifier (backbone + head), its init and its layer-wise lr scales.

``Classifier`` wraps a registry backbone: its ``pre_logits`` go through an
optional ``BatchNorm1d`` (``head_bn``: affine, eps 1e-5, momentum 0.1 as
torch's, i.e. Flax momentum 0.9) and a ``Linear(d, C)`` head with weight
N(0, 0.01) and bias 0 (the study's ``LinearClassifier``). Parameters live
under ``"backbone"``, ``"head_bn"`` and ``"head"``.

``layer_lr_scales`` is the study's ViT rule (iBOT's LayerDecayValueAssigner,
``vitb16_layerwise_lr_scales.csv``): patch embedding and cls / pos /
register / mask tokens are layer 0, block ``i`` is layer ``i + 1``, every
other leaf (final norm, fc_norm, head, head_bn) layer ``L + 1``; the scale is
``decay ** (L + 1 - layer)``. Convnets: 1.0 everywhere.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sslbench_jax.backbones import registry

_LAYER0 = ("patch_embed", "cls_token", "pos_embed", "reg_token", "mask_token")
_BLOCK = re.compile(r"^blocks_(\d+)$")
# Leaves never weight-decayed besides 1-D ones (MAE/BEiT's no_weight_decay list).
_NO_DECAY = ("cls_token", "pos_embed", "reg_token", "mask_token",
             "relative_position_bias_table")


class Classifier(nn.Module):
  """``backbone(x)["pre_logits"]`` -> [BatchNorm1d] -> Linear head.

  Attributes:
    backbone: a registry module (headless).
    num_classes: C.
    head_bn: BatchNorm1d before the head.
    dtype: compute dtype of the head (the loss is always float32).
  """
  backbone: nn.Module
  num_classes: int
  head_bn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               backbone_train: bool | None = None,
               freeze_backbone: bool = False) -> jax.Array:
    """Args: x: normalised NHWC images; train: head BN / drop path mode;
    backbone_train: the backbone's BatchNorm mode (default ``train``);
    freeze_backbone: stop gradients at the representation.

    Returns: float32 logits (B, C).
    """
    bb_train = train if backbone_train is None else backbone_train
    feats = self.backbone(x, train=bb_train)["pre_logits"].astype(jnp.float32)
    if freeze_backbone:
      feats = jax.lax.stop_gradient(feats)
    if self.head_bn:
      feats = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, name="head_bn")(feats)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                    bias_init=nn.initializers.zeros, name="head")(feats)


def build(arch: str, num_classes: int, *, head_bn: bool = False,
          drop_path: float = 0.0, dtype: Any = jnp.float32,
          arch_options: dict[str, Any] | None = None) -> Classifier:
  """The ``Classifier`` of ``arch`` (``arch_options``: the weights' sidecar's)."""
  options = dict(arch_options or {})
  family = registry.family(arch)
  if family == "vit":
    options.update(num_classes=0, drop_path_rate=float(drop_path))
  elif family == "resnet":
    options["num_classes"] = None
  elif family == "efficientnet":
    options["num_classes"] = 0
  backbone = registry.create_model(arch, **options, dtype=dtype)
  return Classifier(backbone=backbone, num_classes=int(num_classes), head_bn=head_bn)


def _example(model: Classifier) -> jax.ShapeDtypeStruct:
  patch = getattr(model.backbone, "patch_size", None)
  side = 2 * patch if patch else 64
  return jnp.zeros((2, side, side, 3), jnp.float32)


def init_variables(model: Classifier, seed: int = 0) -> dict[str, Any]:
  """All variables (``params`` [+ ``batch_stats``]) of a fresh ``model``."""
  return jax.jit(lambda k: model.init(k, _example(model), train=False))(
      jax.random.PRNGKey(seed))


def init_params(arch: str, num_classes: int, seed: int = 0, *,
                head_bn: bool = False, abstract: bool = False,
                **arch_options: Any) -> dict[str, Any]:
  """The trainable parameter tree of ``arch`` with a ``num_classes`` head.

  Args:
    arch: a ``registry.ARCHS`` name.
    num_classes: classes of the head.
    seed: init seed (the backbone's random init; the head N(0, 0.01) / 0).
    head_bn: include the BatchNorm1d before the head.
    abstract: return ``jax.ShapeDtypeStruct`` leaves (no computation).
    **arch_options: backbone options (e.g. ``depth=2``, ``width=64``).

  Returns:
    ``{"backbone": ..., "head": {"kernel", "bias"}[, "head_bn": ...]}``.
  """
  model = build(arch, num_classes, head_bn=head_bn, arch_options=arch_options)
  if abstract:
    return jax.eval_shape(
        lambda k: model.init(k, _example(model), train=False),
        jax.random.PRNGKey(seed))["params"]
  return init_variables(model, seed)["params"]


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def _vit_layer(names: list[str], depth: int) -> int:
  for n in names:
    m = _BLOCK.match(n)
    if m:
      return int(m.group(1)) + 1
  if any(n in _LAYER0 for n in names):
    return 0
  return depth + 1


def layer_lr_scales(arch: str, params: Any, layer_decay: float) -> Any:
  """Each leaf's learning-rate multiplier (module docstring's rule).

  Args:
    arch: the backbone architecture (convnets: 1.0 everywhere).
    params: a parameter tree (``init_params`` output, or the backbone's).
    layer_decay: the decay, e.g. 0.65 (1.0: no decay).

  Returns:
    A tree of Python floats with the structure of ``params``.
  """
  if registry.family(arch) != "vit":
    return jax.tree.map(lambda _: 1.0, params)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  blocks = [int(m.group(1)) for path, _ in leaves for n in _names(path)
            for m in [_BLOCK.match(n)] if m]
  depth = max(blocks) + 1 if blocks else 0
  return jax.tree_util.tree_map_with_path(
      lambda path, _: float(layer_decay) ** (depth + 1 - _vit_layer(_names(path), depth)),
      params)


def weight_decay_mask(params: Any) -> Any:
  """True where weight decay applies: >= 2-D weights that are not tokens."""
  return jax.tree_util.tree_map_with_path(
      lambda path, v: bool(np.ndim(v) >= 2 and not any(
          n in _NO_DECAY for n in _names(path))), params)
