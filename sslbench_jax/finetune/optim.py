"""optax optimizers with torch's update rules, per-leaf learning rates and the schedule.

The update of leaf ``p`` at step ``t`` (epoch ``e = t // steps_per_epoch``)::

  g <- g * min(1, clip / (||g||_global + 1e-6))     # torch.nn.utils.clip_grad_norm_
  SGD:   d = g + wd * m * p ; buf = momentum * buf + d ; p -= lr_p(e) * buf
  AdamW: p -= lr_p(e) * (adam(g) + wd * m * p)      # torch.optim.AdamW (decoupled)

with ``m`` the weight-decay mask (no decay on 1-D leaves or tokens) and
``lr_p(e) = abs_lr(group) * layer_scale_p * recipe.lr_factor(e)``: the head and
backbone groups have their own base rates (few-shot setups), the layer scale is
``layer_lr_scales``. These are exactly torch's param-group rules, so a PyTorch
loop with one param group per distinct rate is the reference
(tests/finetune_parity_test.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslbench_jax.finetune import model as model_lib
from sslbench_jax.finetune.recipes import Recipe

_HEAD = ("head", "head_bn")


class _CountState(NamedTuple):
  count: jax.Array


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """torch's ``clip_grad_norm_``: scale by ``min(1, max / (norm + 1e-6))``."""
  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _scale_by_epoch_lr(factors: np.ndarray, steps_per_epoch: int,
                       leaf_lrs: Any) -> optax.GradientTransformation:
  """``u <- -leaf_lr * factors[step // steps_per_epoch] * u``."""
  table = jnp.asarray(factors, jnp.float32)

  def init(params):
    del params
    return _CountState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    epoch = jnp.minimum(state.count // steps_per_epoch, len(factors) - 1)
    f = table[epoch]
    out = jax.tree.map(lambda u, lr: (-lr * f).astype(u.dtype) * u, updates, leaf_lrs)
    return out, _CountState(state.count + 1)
  return optax.GradientTransformation(init, update)


def leaf_learning_rates(recipe: Recipe, arch: str, params: Any) -> Any:
  """Each trainable leaf's absolute peak learning rate (Python floats)."""
  scales = model_lib.layer_lr_scales(arch, params, recipe.layer_decay)
  def lr(path, s):
    top = str(getattr(path[0], "key", path[0]))
    return recipe.abs_lr(head=top in _HEAD) * s
  return jax.tree_util.tree_map_with_path(lr, scales)


def lr_factors(recipe: Recipe) -> np.ndarray:
  """The schedule's factor per epoch."""
  return np.asarray([recipe.lr_factor(e) for e in range(recipe.epochs)], np.float64)


def make_optimizer(recipe: Recipe, arch: str, params: Any,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """The recipe's optimizer over the trainable tree ``params``.

  Args:
    recipe: the protocol's ``Recipe``.
    arch: backbone architecture (layer decay applies to ViTs only).
    params: the trainable parameters (structure only).
    steps_per_epoch: optimizer steps per epoch (the schedule is epoch-wise).

  Returns:
    An ``optax.GradientTransformation``.
  """
  parts = []
  if recipe.clip_norm is not None:
    parts.append(clip_by_global_norm_torch(recipe.clip_norm))
  mask = model_lib.weight_decay_mask(params)
  if recipe.optimizer == "sgd":
    if recipe.weight_decay:
      parts.append(optax.add_decayed_weights(recipe.weight_decay, mask))
    if recipe.momentum:
      parts.append(optax.trace(decay=recipe.momentum, nesterov=False))
  else:
    parts.append(optax.scale_by_adam(b1=recipe.betas[0], b2=recipe.betas[1],
                                     eps=recipe.eps))
    if recipe.weight_decay:
      parts.append(optax.add_decayed_weights(recipe.weight_decay, mask))
  parts.append(_scale_by_epoch_lr(lr_factors(recipe), steps_per_epoch,
                                  leaf_learning_rates(recipe, arch, params)))
  return optax.chain(*parts)


def current_lr(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
  """The (backbone group's, scale 1) learning rate applied at ``step``."""
  epoch = min(step // steps_per_epoch, recipe.epochs - 1)
  return recipe.abs_lr() * recipe.lr_factor(epoch)
