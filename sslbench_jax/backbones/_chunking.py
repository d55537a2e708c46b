"""Eval-mode forward passes in small batch chunks on CPU.

XLA:CPU runs a convolution network's eval forward pass markedly slower per
image at batch 128 than at batch 8-32: the activations of a large batch
(ResNet-50 layer1: 128 x 56 x 56 x 256 float32 = 400 MB per tensor) stream
through memory once per layer, while a chunk's stay in the caches
(BENCHMARKS.md "Forward pass throughput": ResNet-50 float32 at batch 128,
whole batch vs ``lax.map`` over chunks). So on the CPU backend an eval
forward pass of a large batch is run as ``lax.map`` over chunks whose widest
activation fits in ``CPU_CHUNK_BYTES`` (8 images of ResNet-50 at 224 px), of
the same module (one compiled body, the same
weights): rows are independent in eval mode, and each chunk computes exactly
what the whole batch computes for those rows (bit-identical on XLA:CPU,
``tests/backbone_chunking_test.py``). Training (batch statistics), other
backends and multi-device meshes (a sharded batch axis) run the whole batch.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

# On CPU, a chunk's widest activation should fit in this many bytes (the
# 32 MB L3 of the measured AMD EPYC): ResNet-50 at 224 px in float32 has
# 56 x 56 x 256 x 4 B = 3.2 MB per image after its first stage, so chunks of
# 8 (25.7 MB), the measured best (8 > 16 > 32 > whole batch of 128). Small
# images (e.g. 32 px: 16 KB per image) fit whole batches: not chunked.
CPU_CHUNK_BYTES = 32 * 2 ** 20


def chunk_size(setting: int | None, batch: int, image_bytes: int) -> int:
  """Images per chunk for a forward pass of ``batch`` images; 0 = whole batch.

  Args:
    setting: the backbone's ``eval_chunk``: None = automatic (with one CPU
      device, the largest power of two whose ``image_bytes`` fit in
      ``CPU_CHUNK_BYTES``; the whole batch on other backends and on several
      devices), 0 = never chunk, k > 0 = chunks of k in any case.
    batch: rows of this call.
    image_bytes: bytes of one image's widest activation.
  """
  if setting is None:
    setting = 0
    # One CPU device only: under a multi-device mesh the batch axis is
    # sharded, and chunks of consecutive rows would serialise the devices.
    if jax.default_backend() == "cpu" and jax.device_count() == 1:
      fit = max(CPU_CHUNK_BYTES // max(int(image_bytes), 1), 1)
      setting = 1 << (fit.bit_length() - 1)
  if setting < 0:
    raise ValueError(f"eval_chunk must be None or >= 0, got {setting}")
  # A batch of fewer than two chunks gains nothing from the loop.
  return setting if setting and batch >= 2 * setting else 0


def apply_in_chunks(module: Any, x: jax.Array, chunk: int) -> Any:
  """``module(x, train=False)`` computed ``chunk`` rows at a time.

  ``module`` is the bound backbone (inside its ``__call__``); its variables
  are applied to each chunk by an unbound clone with chunking off. The last
  chunk is padded with zero rows, dropped from the outputs.
  """
  variables = module.variables
  inner = module.clone(parent=None, eval_chunk=0)
  n = x.shape[0]
  steps = -(-n // chunk)
  if steps * chunk != n:
    x = jnp.concatenate([x, jnp.zeros((steps * chunk - n,) + x.shape[1:], x.dtype)])
  out = lax.map(lambda xc: inner.apply(variables, xc, train=False),
                x.reshape((steps, chunk) + x.shape[1:]))
  return jax.tree.map(lambda y: y.reshape((steps * chunk,) + y.shape[2:])[:n], out)
