"""ResNet v1.5 (torchvision layout) in Flax linen, NHWC.

Matches ``torchvision.models.resnet``: 7x7/2 stem conv, BatchNorm, ReLU, 3x3/2
max-pool, four stages whose first block downsamples with a strided 3x3 conv
(v1.5: the stride sits on the 3x3, not the 1x1, of a bottleneck) and a 1x1
projection shortcut. Padding is written out as torch's symmetric padding, never
``"SAME"`` (which pads asymmetrically for stride 2 and would not match).

Wide variants (``width_multiplier`` 2 or 4, SimCLR's r50_2x / SwAV's
``resnet50w2``/``resnet50w4``) multiply *every* width by the multiplier,
including the stem (SwAV: ``inplanes = width_per_group * widen`` feeds conv1),
so ResNet-50x2 has a 128-channel stem, 128-wide first bottlenecks and a
4096-d representation: 94M / 375M trunk parameters for x2 / x4, the counts
SwAV and SimCLR publish. (One SwAV revision scaled the bottleneck inner
width by the multiplier a second time; the later code and the published
parameter counts do not.) A checkpoint of the other kind fails conversion
with a shape error rather than loading wrongly.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer{i}_{j}``,
``downsample_conv``/``downsample_bn``, ``fc``) so the checkpoint key map stays
obvious. BatchNorm running statistics live in the ``batch_stats`` collection.

Example:
  >>> model = ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck")
  >>> variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  >>> model.apply(variables, images, train=False)["pre_logits"].shape
  (B, 2048)
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sslbench_jax.backbones import _chunking
from sslbench_jax.backbones import _precision

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu").
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_BLOCKS = ("basic", "bottleneck")


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # torch's padding=k//2 on both sides of both spatial axes.
  return ((k // 2, k // 2), (k // 2, k // 2))


class _Block(nn.Module):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block."""
  width: int
  bottleneck: bool
  strides: int
  project: bool
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.bottleneck:
      specs = [(1, 1, self.width), (3, self.strides, self.width),
               (1, 1, self.width * 4)]
    else:
      specs = [(3, self.strides, self.width), (3, 1, self.width)]
    y = x
    for i, (k, s, feats) in enumerate(specs, start=1):
      y = self.conv(feats, (k, k), (s, s), padding=_pad(k), name=f"conv{i}")(y)
      y = self.norm(name=f"bn{i}")(y)
      if i < len(specs):
        y = nn.relu(y)
    if self.project:
      x = self.conv(specs[-1][2], (1, 1), (self.strides, self.strides),
                    padding=((0, 0), (0, 0)), name="downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """torchvision-style ResNet returning ``{"pre_logits", ["logits"]}``.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
    block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50+).
    width_multiplier: 1, 2 or 4; scales all widths including the stem.
    num_classes: size of the ``fc`` classifier producing ``"logits"``; None
      for a headless backbone.
    dtype: computation dtype (parameters and BatchNorm statistics stay
      float32; outputs are float32). bfloat16/float16 convolutions
      accumulate in float32 and round each result once (``_precision``).
    eval_chunk: eval-mode batches are computed this many images at a time
      (``lax.map``; the same results, faster on CPU where a large batch's
      activations miss the caches, ``_chunking``); None = automatic (with
      one CPU device, chunks whose first-stage activations fit in 32 MB: 8
      images of ResNet-50 at 224 px in float32; small images, several
      devices and other backends: the whole batch), 0 = whole batch.
  """
  stage_sizes: Sequence[int]
  block: str = "bottleneck"
  width_multiplier: int = 1
  num_classes: int | None = None
  dtype: Any = jnp.float32
  eval_chunk: int | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    """Args: x: (B, H, W, 3) normalised images; train: batch statistics mode.

    Returns:
      ``"pre_logits"`` (B, C) global average pool of the last stage (float32),
      ``"layer3_avg"`` the same pool of the stage before it (layer-wise
      probes) and, if ``num_classes`` is set, ``"logits"`` (B, num_classes).
    """
    if self.block not in _BLOCKS:
      raise ValueError(f"block must be one of {_BLOCKS}, got {self.block!r}")
    bottleneck = self.block == "bottleneck"
    expansion = 4 if bottleneck else 1
    base = 64 * self.width_multiplier
    # widest activation per image: the first stage's output (H/4 x W/4)
    widest = (-(-x.shape[1] // 4) * -(-x.shape[2] // 4) * base * expansion
              * jnp.dtype(self.dtype).itemsize)
    chunk = 0 if train or self.is_initializing() else _chunking.chunk_size(
        self.eval_chunk, x.shape[0], widest)
    if chunk:
      return _chunking.apply_in_chunks(self, x, chunk)
    # bf16/f16: float32 accumulation, 1x1 convs as dots (faster on CPU, see
    # _precision); float32 keeps flax's defaults.
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=_conv_init,
                             **_precision.conv_kwargs(self.dtype))
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                             param_dtype=jnp.float32)

    x = jnp.asarray(x, self.dtype)
    x = conv(base, (7, 7), (2, 2), padding=_pad(7), name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    # Flax pads max-pool windows with -inf, like torch's MaxPool2d(padding=1).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    in_features = base
    for stage, num_blocks in enumerate(self.stage_sizes):
      width = base * 2 ** stage
      for j in range(num_blocks):
        strides = 2 if stage > 0 and j == 0 else 1
        project = j == 0 and (strides != 1 or in_features != width * expansion)
        x = _Block(width, bottleneck, strides, project, conv, norm,
                   name=f"layer{stage + 1}_{j}")(x)
        in_features = width * expansion
      if stage == len(self.stage_sizes) - 2:
        # Intermediate representation for layer-wise probes (cheap to keep).
        layer3_avg = jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    pre_logits = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out = {"pre_logits": pre_logits, "layer3_avg": layer3_avg}
    if self.num_classes is not None:
      out["logits"] = nn.Dense(self.num_classes, dtype=jnp.float32,
                               param_dtype=jnp.float32, name="fc")(pre_logits)
    return out
