"""Vision Transformer (timm / DINO / MAE / BEiT v2 / DINOv2 layouts) in Flax.

One module covers the ViT variants self-supervised checkpoints use:

* plain timm ViT (DINO, MoCo v3, iBOT, MAE, MILAN): CLS token + absolute
  position embedding, pre-norm blocks, final ``norm``;
* ``pool="mean"``: MAE global pool / BEiT v2 — the representation is
  ``fc_norm(mean of patch tokens)`` and there is no per-token final norm;
* ``num_registers``/``layerscale``: DINOv2 (with registers, arXiv:2309.16588);
* ``rel_pos_bias``: BEiT v2 per-block relative position bias with no absolute
  position embedding (arXiv:2208.06366).

Position-embedding interpolation (input grid ``(h, w)`` differs from the
pretraining grid ``g = img_size // patch_size``): the patch part of
``pos_embed`` is resized with torch's bicubic ``F.interpolate`` as the
checkpoint's own code does it; two options select one of three calls:

* ``pos_interp_offset=o > 0`` (default 0.1), ``pos_interp_antialias=False``:
  DINO / iBOT / DINOv2 ``interpolate_pos_encoding``,
  ``F.interpolate(x, scale_factor=((h + o) / g, (w + o) / g),
  mode="bicubic", align_corners=False)``. That is Keys cubic convolution with
  ``A=-0.75``, edge-clamped taps and source coordinates
  ``(dst + 0.5) * g / (h + o) - 0.5``;
* ``o = 0``: ``size=(h, w)``, the resize MAE (``interpolate_pos_embed``),
  BEiT and MMPretrain (``resize_pos_embed``) apply;
* ``o = 0`` and ``pos_interp_antialias=True``: timm's
  ``resample_abs_pos_embed`` (``size=``, ``antialias=True``, its default)
  and DINOv2 with registers (``interpolate_antialias=True,
  interpolate_offset=0``). Torch's antialiased bicubic is a different filter:
  Keys ``A=-0.5``, support stretched by the scale when downsampling, taps
  outside the grid dropped and the weights renormalised (PIL's scheme).

All three are applied as explicit per-axis matrices (``bicubic_matrix``);
``jax.image.resize`` is not used, its cubic kernel being ``A=-0.5`` only.
The converter picks the options from the checkpoint's layout
(``convert.vit_keys.pos_interp_rule``). The CLS position is kept.

For ``rel_pos_bias`` the ``(2g-1)x(2g-1)`` part of each bias table is
resized with ``o = 0`` and no antialiasing (the three CLS entries are kept)
and the index is rebuilt for the new grid. (BEiT's own fine-tuning code
resizes these tables differently, with a SciPy cubic spline over
geometrically spaced offsets; that is not reproduced.)

Outputs of ``model.apply(variables, images_nhwc, train=False)``:

* ``"pre_logits"``: ``cls`` for ``pool="cls"``, ``patch_mean`` for ``"mean"``;
* ``"cls"``: CLS token after the final norm (``fc_norm`` for mean pool);
* ``"patch_mean"``: mean of the normalised patch tokens (for ``pool="mean"``
  the mean of the patch tokens, then ``fc_norm``, as MAE/BEiT v2 do);
  registers and CLS are excluded;
* ``"last4_cls"``: the CLS tokens of the last 4 blocks (fewer if the model is
  shallower), each through the final norm, concatenated (DINO linear
  evaluation, ``n_last_blocks=4``): shape ``(B, 4 * width)``;
* ``"logits"``: only when ``num_classes`` is set (> 0).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sslbench_jax.backbones import _precision

_POOLS = ("cls", "mean")


def _torch_cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Weights of the 4 taps at offsets -1..2 for fractional position ``t``."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel at (any) ``x``; zero for ``|x| >= 2``."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((x - 5) * x + 8) * x * a - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _antialias_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """Torch's ``_upsample_bicubic2d_aa`` weights (PIL's resampling scheme)."""
  # Downsampling stretches the filter over ``scale`` source pixels; the taps
  # range is truncated to the grid (C-style int casts) and renormalised.
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  matrix = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = np.arange(lo, hi)
    weights = _keys_cubic((taps - center + 0.5) * invscale, -0.5)
    total = weights.sum()
    matrix[i, lo:hi] = weights / total if total != 0.0 else weights
  return matrix


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, offset: float = 0.0,
                   antialias: bool = False) -> np.ndarray:
  """``(out_size, in_size)`` matrix of torch's bicubic (align_corners=False).

  Args:
    in_size: source length.
    out_size: destination length.
    offset: 0 for ``F.interpolate(size=out)``; ``o`` for
      ``F.interpolate(scale_factor=(out + o) / in)`` (DINO's 0.1).
    antialias: torch's ``antialias=True`` filter (timm's default).

  Returns:
    float64 matrix ``M`` with ``resized = M @ source`` along one axis, equal
    to that ``F.interpolate(..., mode="bicubic", align_corners=False,
    antialias=antialias)`` along that axis.
  """
  scale = in_size / (out_size + offset)
  if antialias:
    # Torch's antialiased kernel skips an axis whose length is unchanged,
    # whatever the scale factor.
    if in_size == out_size:
      return np.eye(in_size)
    return _antialias_matrix(in_size, out_size, scale)
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  weights = _torch_cubic_weights(src - base)
  matrix = np.zeros((out_size, in_size), np.float64)
  for tap in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), idx), weights[:, tap])
  return matrix


def resize_grid(grid: jax.Array, out_hw: tuple[int, int],
                offset: float = 0.0, antialias: bool = False) -> jax.Array:
  """Bicubic resize of a ``(h, w, C)`` grid, as torch's (see ``bicubic_matrix``).

  Args:
    grid: ``(h, w, C)`` array.
    out_hw: output ``(h', w')``; equal to ``(h, w)`` returns ``grid`` as is.
    offset: DINO's scale-factor offset (0 for a plain ``size=`` resize).

  Returns:
    ``(h', w', C)`` float32 array.
  """
  h, w = grid.shape[:2]
  if (h, w) == tuple(out_hw):
    return grid
  mh = jnp.asarray(bicubic_matrix(h, out_hw[0], offset, antialias), jnp.float32)
  mw = jnp.asarray(bicubic_matrix(w, out_hw[1], offset, antialias), jnp.float32)
  out = jnp.einsum("oi,ijc->ojc", mh, grid.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pj,ojc->opc", mw, out, precision=jax.lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=16)
def relative_position_index(grid_h: int, grid_w: int) -> np.ndarray:
  """BEiT's ``(N+1, N+1)`` index into the relative position bias table.

  Entries ``[(2h-1)(2w-1)]``, ``+1``, ``+2`` of the table are the
  CLS->token, token->CLS and CLS->CLS biases.
  """
  coords = np.stack(np.meshgrid(np.arange(grid_h), np.arange(grid_w),
                                indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel[:, :, 0] += grid_h - 1
  rel[:, :, 1] += grid_w - 1
  rel[:, :, 0] *= 2 * grid_w - 1
  num = (2 * grid_h - 1) * (2 * grid_w - 1)
  n = grid_h * grid_w
  index = np.zeros((n + 1, n + 1), np.int64)
  index[1:, 1:] = rel.sum(-1)
  index[0, :] = num
  index[:, 0] = num + 1
  index[0, 0] = num + 2
  return index


class Attention(nn.Module):
  """Multi-head self-attention with an optional BEiT relative position bias."""
  num_heads: int
  qkv_bias: bool = True
  rel_pos_grid: tuple[int, int] | None = None  # pretraining grid of the table
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    b, t, d = x.shape
    hd = d // self.num_heads
    # bf16/f16: float32 accumulation (faster on CPU, see _precision); float32
    # keeps flax's defaults.
    reduced = _precision.is_reduced(self.dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              **_precision.dense_kwargs(self.dtype))
    qkv = dense(3 * d, use_bias=self.qkv_bias, name="qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, self.num_heads, hd), 2, 0)
    if reduced:
      logits = _precision.einsum("bqhd,bkhd->bhqk", q * (hd ** -0.5), k,
                                 out_dtype=jnp.float32)
    else:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q * (hd ** -0.5), k)
      logits = logits.astype(jnp.float32)
    if self.rel_pos_grid is not None:
      gh, gw = self.rel_pos_grid
      size = (2 * gh - 1) * (2 * gw - 1) + 3
      table = self.param("relative_position_bias_table", nn.initializers.zeros,
                         (size, self.num_heads), jnp.float32)
      if tuple(grid_hw) != (gh, gw):
        main = resize_grid(table[:-3].reshape(2 * gh - 1, 2 * gw - 1, -1),
                           (2 * grid_hw[0] - 1, 2 * grid_hw[1] - 1))
        table = jnp.concatenate([main.reshape(-1, self.num_heads), table[-3:]])
      index = relative_position_index(*grid_hw)
      bias = table[index.reshape(-1)].reshape(index.shape + (self.num_heads,))
      logits = logits + jnp.transpose(bias, (2, 0, 1))[None]
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    mix = _precision.einsum if reduced else jnp.einsum
    out = mix("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    return dense(d, name="proj")(out)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              **_precision.dense_kwargs(self.dtype))
    x = dense(self.hidden, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return dense(d, name="fc2")(x)


class LayerScale(nn.Module):
  """Per-channel scale ``gamma`` on a residual branch (CaiT / DINOv2 / BEiT)."""
  init_value: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param("gamma", nn.initializers.constant(self.init_value),
                       (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layerscale: float | None = None
  rel_pos_grid: tuple[int, int] | None = None
  drop_path: float = 0.0
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, grid_hw: tuple[int, int],
               train: bool) -> jax.Array:
    norm = functools.partial(nn.LayerNorm, epsilon=self.ln_eps, dtype=self.dtype,
                             use_fast_variance=False)
    # Stochastic depth: one Bernoulli draw per sample (broadcast over tokens).
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2),
                      deterministic=not train or self.drop_path == 0.0)
    y = Attention(self.num_heads, self.qkv_bias, self.rel_pos_grid, self.dtype,
                  name="attn")(norm(name="norm1")(x), grid_hw)
    if self.layerscale is not None:
      y = LayerScale(self.layerscale, name="ls1")(y)
    x = x + drop(y)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype,
            name="mlp")(norm(name="norm2")(x))
    if self.layerscale is not None:
      y = LayerScale(self.layerscale, name="ls2")(y)
    return x + drop(y)


class VisionTransformer(nn.Module):
  """ViT on NHWC images.

  Attributes:
    patch_size: patch side in pixels.
    width: token dimension.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden size / width.
    qkv_bias: bias on the qkv projection (BEiT's q/v-only bias converts to a
      full bias with zero key part; a key bias does not change attention).
    layerscale: LayerScale init value, None for no LayerScale.
    num_registers: register tokens after CLS (DINOv2-reg); they carry no
      position embedding.
    pool: "cls" (CLS after final ``norm``) or "mean" (``fc_norm`` of the mean
      patch token; no per-token final norm).
    rel_pos_bias: BEiT per-block relative position bias instead of an
      absolute position embedding.
    drop_path_rate: stochastic depth, linearly increasing over blocks; only
      active with ``train=True`` and a ``"dropout"`` rng.
    img_size: pretraining input size; it fixes the position-embedding grid.
    pos_interp_offset: DINO's ``+0.1`` when resizing the position embedding
      to another grid (module docstring); 0 for a plain size-based resize.
    pos_interp_antialias: resize with torch's antialiased bicubic (timm,
      DINOv2 with registers); default False keeps DINO's/MAE's resize.
    ln_eps: LayerNorm epsilon (timm 1e-6; some sources use 1e-5).
    num_classes: adds a linear ``head`` on ``pre_logits`` when > 0 (None
      or 0: no classifier).
    dtype: compute dtype (parameters stay float32). bfloat16/float16
      compute accumulates every dot, attention einsum and the patch
      embedding in float32 and rounds each result once (``_precision``).
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layerscale: float | None = None
  num_registers: int = 0
  pool: str = "cls"
  rel_pos_bias: bool = False
  drop_path_rate: float = 0.0
  img_size: int = 224
  pos_interp_offset: float = 0.1
  pos_interp_antialias: bool = False
  ln_eps: float = 1e-6
  num_classes: int | None = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    if self.pool not in _POOLS:
      raise ValueError(f"pool={self.pool!r}; expected one of {_POOLS}")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    p, d = self.patch_size, self.width
    grid_hw = (images.shape[1] // p, images.shape[2] // p)
    if min(grid_hw) < 1:
      raise ValueError(f"input {images.shape[1:3]} is smaller than one "
                       f"{p}x{p} patch")
    pre_grid = self.img_size // p
    # In bf16 the patch embedding runs as patchify + one dot (_precision).
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="patch_embed", **_precision.conv_kwargs(self.dtype)
                )(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, d)
    if _precision.is_reduced(self.dtype):
      # The residual stream stays float32 (bf16 only inside the blocks'
      # norms, dots and MLP): cheap, and keeps the features within 1e-2 of
      # float32 over 12+ blocks.
      x = x.astype(jnp.float32)
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", init, (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], 1)
    if not self.rel_pos_bias:
      pos = self.param("pos_embed", init, (1, 1 + pre_grid ** 2, d), jnp.float32)
      patch_pos = resize_grid(pos[0, 1:].reshape(pre_grid, pre_grid, d), grid_hw,
                              self.pos_interp_offset, self.pos_interp_antialias)
      pos = jnp.concatenate([pos[0, :1], patch_pos.reshape(-1, d)])
      x = x + pos[None].astype(x.dtype)
    if self.num_registers:
      reg = self.param("reg_token", init, (1, self.num_registers, d), jnp.float32)
      x = jnp.concatenate(
          [x[:, :1], jnp.broadcast_to(reg, (b,) + reg.shape[1:]).astype(x.dtype),
           x[:, 1:]], 1)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    rel_grid = (pre_grid, pre_grid) if self.rel_pos_bias else None
    cls_per_block = []
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.qkv_bias, self.layerscale,
                rel_grid, float(rates[i]), self.ln_eps, self.dtype,
                name=f"blocks_{i}")(x, grid_hw, train)
      if i >= self.depth - 4:
        cls_per_block.append(x[:, 0])

    norm = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype,
                        use_fast_variance=False,
                        name="fc_norm" if self.pool == "mean" else "norm")
    first_patch = 1 + self.num_registers
    if self.pool == "mean":
      # Means are taken in float32 so bf16 compute does not lose the average.
      patch_mean = norm(x[:, first_patch:].mean(axis=1, dtype=jnp.float32))
      cls_out = norm(x[:, 0])
      pre_logits = patch_mean
    else:
      x = norm(x)
      cls_out = x[:, 0]
      patch_mean = x[:, first_patch:].mean(axis=1, dtype=jnp.float32).astype(x.dtype)
      pre_logits = cls_out
    # The last block's CLS is the one already normalised above.
    last = [norm(c) for c in cls_per_block[:-1]] + [cls_out]
    out = {"pre_logits": pre_logits, "cls": cls_out, "patch_mean": patch_mean,
           "last4_cls": jnp.concatenate(last, axis=-1)}
    if self.num_classes:  # None or 0: no classifier
      out["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                               **_precision.dense_kwargs(self.dtype))(pre_logits)
    return out
