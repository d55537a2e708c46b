"""Reduced-precision compute for the backbones: bfloat16 in, float32 accumulate.

XLA:CPU runs a bfloat16 x bfloat16 dot whose result type is float32 about twice
as fast as the same dot with a bfloat16 result (measured on an AMD EPYC with
AVX-512-BF16 at ViT-S/16 shapes, BENCHMARKS.md "Forward pass throughput"), and
it runs convolutions through a slower path than dots. So, for a module whose
compute dtype is bfloat16 (or float16):

* ``dot_general`` accumulates in float32 (``preferred_element_type``) and
  rounds the result to the input dtype once;
* ``conv_general_dilated`` does the same and, when the convolution is a dot
  in disguise (1x1 kernel, any stride; or non-overlapping ``kernel == stride``
  patches, e.g. the ViT patch embedding), runs it as one strided slice or one
  patch reshape followed by that dot.

Both are drop-in values for flax's ``nn.Dense(dot_general=...)`` /
``nn.Conv(conv_general_dilated=...)`` (parameter names and shapes unchanged;
plain ``lax`` ops, so gradients work). Float32 modules never use them
(``dense_kwargs``/``conv_kwargs`` return ``{}``): their results stay bit-for-bit the ``lax``
defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

_REDUCED = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_reduced(dtype: Any) -> bool:
  """True for the compute dtypes that get float32 accumulation (bf16, f16)."""
  return dtype is not None and jnp.dtype(dtype) in _REDUCED


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                precision: Any = None, preferred_element_type: Any = None,
                **kwargs: Any) -> jax.Array:
  """``lax.dot_general`` accumulating in float32, result in the inputs' dtype.

  An explicit ``preferred_element_type`` from the caller wins.
  """
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  y = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                      preferred_element_type=jnp.float32, **kwargs)
  return y.astype(out_dtype)


def einsum(subscripts: str, *operands: jax.Array,
           out_dtype: Any = None) -> jax.Array:
  """``jnp.einsum`` accumulating in float32; result ``out_dtype`` (default the
  operands' dtype)."""
  out_dtype = out_dtype or jnp.result_type(*operands)
  y = jnp.einsum(subscripts, *operands, preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


def _pairs(padding: Any, n: int) -> list[tuple[int, int]] | None:
  if isinstance(padding, str):
    return [(0, 0)] * n if padding.upper() == "VALID" else None
  return [tuple(p) for p in padding]


def _is_nhwc(dimension_numbers: Any, ndim: int) -> bool:
  # flax.linen.Conv passes channels-last lhs/out and (spatial..., in, out) kernels.
  if dimension_numbers is None:
    return False
  lhs, rhs, out = dimension_numbers
  spatial = tuple(range(1, ndim - 1))
  return (tuple(lhs) == (0, ndim - 1) + spatial and tuple(out) == tuple(lhs)
          and tuple(rhs) == (ndim - 1, ndim - 2) + tuple(range(ndim - 2)))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None,
                         feature_group_count: int = 1,
                         batch_group_count: int = 1,
                         precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """``lax.conv_general_dilated`` accumulating in float32, result in the
  inputs' dtype; pointwise and non-overlapping-patch convolutions (flax's
  channels-last layout, no padding/dilation/groups) run as one dot."""
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  nd = lhs.ndim - 2
  window = tuple(rhs.shape[:nd])
  strides = tuple(window_strides)
  pads = _pairs(padding, nd)
  plain = (
      _is_nhwc(dimension_numbers, lhs.ndim) and feature_group_count == 1
      and batch_group_count == 1 and pads == [(0, 0)] * nd
      and all(d == 1 for d in (lhs_dilation or (1,) * nd))
      and all(d == 1 for d in (rhs_dilation or (1,) * nd)))
  contract = (((lhs.ndim - 1,), (0,)), ((), ()))
  if plain and all(k == 1 for k in window):
    # Pointwise: subsample by the stride, then one (pixels x in) @ (in x out).
    x = lhs[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
    return dot_general(x, rhs.reshape(rhs.shape[-2:]), contract, precision,
                       out_dtype)
  if plain and window == strides and nd == 2:
    # Non-overlapping k x k patches (ViT patch embedding): patchify + one dot.
    (kh, kw), (b, h, w, c) = window, lhs.shape
    gh, gw = h // kh, w // kw
    x = lhs[:, :gh * kh, :gw * kw].reshape(b, gh, kh, gw, kw, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh, gw, kh * kw * c)
    return dot_general(x, rhs.reshape(kh * kw * c, rhs.shape[-1]), contract,
                       precision, out_dtype)
  y = lax.conv_general_dilated(
      lhs, rhs, strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


def dense_kwargs(dtype: Any) -> dict[str, Any]:
  """Keyword arguments for ``nn.Dense``/``nn.DenseGeneral`` of compute
  ``dtype``: the float32-accumulating ops for bf16/f16, else ``{}``
  (flax's defaults, so float32 modules are unchanged)."""
  if not is_reduced(dtype):
    return {}
  return {"dot_general": dot_general}


def conv_kwargs(dtype: Any) -> dict[str, Any]:
  """Keyword arguments for ``nn.Conv`` of compute ``dtype`` (see
  ``dense_kwargs``)."""
  if not is_reduced(dtype):
    return {}
  return {"conv_general_dilated": conv_general_dilated}
