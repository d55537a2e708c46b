"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variants of tensorflow/tpu).

Lite differs from EfficientNet-B0 in what makes it quantisation friendly: no
squeeze-excite, ReLU6 instead of swish, and a stem (32) and head (1280) whose
widths are not scaled. Convolutions use TensorFlow "SAME" padding (extra pixel
at the bottom/right for even padding), as the released weights were trained
in TensorFlow and ported with that padding kept (the lukemelas PyTorch port
pads the same way); PyTorch's usual symmetric ``padding=k//2`` would sample
every stride-2 layer half a pixel off.

The model expects NHWC images normalised as ``(x - 127) / 128`` on 0..255
pixels (preset ``"efficientnet_lite"``).

Reference: https://arxiv.org/abs/1905.11946 and
https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

# (expand_ratio, kernel, stride, out_channels, repeats) per stage, from
# efficientnet_lite_builder.py ('r1_k3_s11_e1_i32_o16', ...).
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_WIDTH = 32
HEAD_WIDTH = 1280
# TF defaults of the original: decay 0.99 (Flax uses the same convention as
# TF; PyTorch's momentum would be 0.01) and epsilon 1e-3.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, dtype=dtype, name=name)


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution with TF "SAME" padding, no bias.

  On CPU it is computed as a sum of k*k strided shifted slices times
  per-channel weights: XLA:CPU runs ``feature_group_count=C`` convolutions
  2.5-7x slower than that on the Lite0 shapes (measured with jaxlib 0.10.2),
  while the shifted sum fuses into one elementwise loop. Accelerators use the
  native grouped convolution. The parameter is the same ``kernel`` (k, k, 1,
  C) that ``nn.Conv(..., feature_group_count=C)`` would hold.

  Attributes:
    kernel_size: k.
    stride: spatial stride.
    dtype: computation dtype.
    impl: "auto" (shifted on CPU, grouped elsewhere), "shifted" or "grouped".
  """
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k, s = self.kernel_size, self.stride
    batch, height, width, channels = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, 1, channels), jnp.float32).astype(self.dtype)
    impl = self.impl
    if impl == "auto":
      impl = "shifted" if jax.default_backend() == "cpu" else "grouped"
    if impl == "grouped":
      return lax.conv_general_dilated(
          x.astype(self.dtype), kernel, (s, s), "SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
    if impl != "shifted":
      raise ValueError(f"DepthwiseConv impl must be auto, shifted or grouped, got {impl!r}")
    (top, bottom), (left, right) = lax.padtype_to_pads(
        (height, width), (k, k), (s, s), "SAME")
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = -(-height // s), -(-width // s)
    out = None
    for i in range(k):
      for j in range(k):
        tap = lax.slice(x, (0, i, j, 0),
                        (batch, i + (out_h - 1) * s + 1, j + (out_w - 1) * s + 1, channels),
                        (1, s, s, 1)) * kernel[i, j, 0]
        out = tap if out is None else out + tap
    return out


class MBConv(nn.Module):
  """Inverted residual block without squeeze-excite (Lite).

  Attributes:
    in_channels: input width (the residual needs it).
    out_channels: output width.
    expand_ratio: hidden width = ``in_channels * expand_ratio``; 1 skips the
      expansion conv.
    kernel_size: depthwise kernel size.
    stride: depthwise stride.
    dtype: computation dtype.
  """
  in_channels: int
  out_channels: int
  expand_ratio: int
  kernel_size: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    inputs = x
    hidden = self.in_channels * self.expand_ratio
    if self.expand_ratio != 1:
      x = nn.Conv(hidden, (1, 1), use_bias=False, dtype=self.dtype,
                  name="expand_conv")(x)
      x = nn.relu6(_batch_norm(train, self.dtype, "expand_bn")(x))
    x = DepthwiseConv(self.kernel_size, self.stride, dtype=self.dtype,
                      name="depthwise_conv")(x)
    x = nn.relu6(_batch_norm(train, self.dtype, "depthwise_bn")(x))
    x = nn.Conv(self.out_channels, (1, 1), use_bias=False, dtype=self.dtype,
                name="project_conv")(x)
    x = _batch_norm(train, self.dtype, "project_bn")(x)
    if self.stride == 1 and self.in_channels == self.out_channels:
      # Drop-connect is a training-time regulariser of the original recipe;
      # feature extraction and probing never need it.
      x = x + inputs
    return x


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 classifier / feature extractor.

  Attributes:
    num_classes: classifier width; 0 drops the classifier (no ``"logits"``).
    dtype: computation dtype (parameters stay float32).
    stages: per-stage ``(expand_ratio, kernel, stride, out_channels, repeats)``.

  Returns (from ``__call__``) a dict with ``"pre_logits"`` (B, 1280): the
  global average of the head features after BN + ReLU6, ``"logits"``
  (B, num_classes) when ``num_classes > 0``, and ``"stage{N}_avg"`` for N = 1
  .. len(stages): the global average of the output of block stage N (the last
  block of that stage, after its residual; Lite0: 16, 24, 40, 80, 112, 192,
  320 channels) for layer-wise probes. All are float32. Selecting only an
  early stage under ``jax.jit`` lets XLA drop the later blocks, so early-stage
  features cost only the blocks they need.
  """
  num_classes: int = 1000
  dtype: Any = jnp.float32
  stages: Sequence[tuple[int, int, int, int, int]] = LITE0_STAGES

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"EfficientNetLite0 expects NHWC RGB images, got shape {x.shape}")
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(STEM_WIDTH, (3, 3), strides=(2, 2), padding="SAME",
                use_bias=False, dtype=self.dtype, name="stem_conv")(x)
    x = nn.relu6(_batch_norm(train, self.dtype, "stem_bn")(x))
    in_channels = STEM_WIDTH
    index = 0
    out = {}
    for stage, (expand, kernel, stride, out_channels, repeats) in enumerate(self.stages):
      for r in range(repeats):
        x = MBConv(in_channels, out_channels, expand, kernel,
                   stride if r == 0 else 1, dtype=self.dtype,
                   name=f"blocks_{index}")(x, train)
        in_channels = out_channels
        index += 1
      out[f"stage{stage + 1}_avg"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Conv(HEAD_WIDTH, (1, 1), use_bias=False, dtype=self.dtype,
                name="head_conv")(x)
    x = nn.relu6(_batch_norm(train, self.dtype, "head_bn")(x))
    pre_logits = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out["pre_logits"] = pre_logits
    if self.num_classes:
      # The original's dropout (0.2) before the classifier is a training-only
      # regulariser of its recipe; it is not part of this forward pass.
      out["logits"] = nn.Dense(self.num_classes, dtype=self.dtype,
                               name="classifier")(pre_logits).astype(jnp.float32)
    return out
