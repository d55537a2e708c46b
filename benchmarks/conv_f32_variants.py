"""float32 3x3 convolutions on XLA:CPU: formulations, batch chunking, XLA flags.

Issue 14 (float32 ResNet-50 at batch 128): the 3x3 convolutions are where
JAX trails PyTorch. At ResNet-50's 3x3 shapes (NHWC, as flax runs them),
times in interleaved rounds (median) and reports GFLOP/s of

* ``conv``: ``lax.conv_general_dilated`` (what flax's ``nn.Conv`` runs);
* ``im2col``: the 9 shifted slices concatenated on channels, one dot;
* ``sum9``: 9 shifted 1x1 dots summed (no 9x copy);
* ``rows3``: 3 column shifts concatenated (3x copy), 3 dots over row offsets;
* ``conv_map<k>``: ``conv`` under ``lax.map`` over chunks of k images
  (what ``backbones/_chunking.py`` does for the whole network);
* ``torch_cl``: PyTorch ``conv2d`` on ``channels_last`` tensors,

with each variant's max |difference| / max |conv| (float32 reordering only).
``--xla_flags`` runs the ``conv`` / ``conv_map8`` / torch comparison again in
one subprocess per ``XLA_FLAGS`` value (XLA:CPU reads them at start-up).
Winograd is not an XLA:CPU option.

  .venv/bin/python benchmarks/conv_f32_variants.py --batch 128 --rounds 3
  .venv/bin/python benchmarks/conv_f32_variants.py --batch 128 --rounds 2 \
      --variants conv,conv_map8 --xla_flags=default,--xla_cpu_use_onednn=true
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

_BATCH = flags.DEFINE_integer("batch", 128, "Images per convolution.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved timed rounds.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["conv", "im2col", "sum9", "rows3", "conv_map32", "conv_map8"],
    "JAX formulations to time (torch channels_last always runs).")
_XLA_FLAGS = flags.DEFINE_list(
    "xla_flags", [], "XLA_FLAGS values, one subprocess each ('default' = none).")

# (spatial size, in, out, stride): ResNet-50's 3x3 convs (layer1-4) and the
# first stride-2 3x3 of layer2.
SHAPES = ((56, 64, 64, 1), (28, 128, 128, 1), (14, 256, 256, 1), (7, 512, 512, 1),
          (56, 128, 128, 2))


def _variants():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  contract = (((3,), (0,)), ((), ()))

  def taps(x, s):
    # the padded input and the (row, column) slice of each kernel tap
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = (x.shape[1] - 1) // s + 1, (x.shape[2] - 1) // s + 1
    return xp, lambda i, j: xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s]

  def conv(x, w, s):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    return lax.conv_general_dilated(x, w, (s, s), ((1, 1), (1, 1)), dimension_numbers=dn)

  def im2col(x, w, s):
    _, tap = taps(x, s)
    cols = jnp.concatenate([tap(i, j) for i in range(3) for j in range(3)], -1)
    return lax.dot_general(cols, w.reshape(-1, w.shape[-1]), contract)

  def sum9(x, w, s):
    _, tap = taps(x, s)
    return sum(lax.dot_general(tap(i, j), w[i, j], contract)
               for i in range(3) for j in range(3))

  def rows3(x, w, s):
    xp, _ = taps(x, s)
    ho, wo = (x.shape[1] - 1) // s + 1, (x.shape[2] - 1) // s + 1
    cols = jnp.concatenate([xp[:, :, j:j + s * (wo - 1) + 1:s] for j in range(3)], -1)
    return sum(lax.dot_general(cols[:, i:i + s * (ho - 1) + 1:s],
                               w[i].reshape(-1, w.shape[-1]), contract) for i in range(3))

  def chunked(k):
    def run(x, w, s):
      y = lax.map(lambda xc: conv(xc, w, s), x.reshape((-1, k) + x.shape[1:]))
      return y.reshape((x.shape[0],) + y.shape[2:])
    return run

  out = dict(conv=conv, im2col=im2col, sum9=sum9, rows3=rows3)
  for name in _VARIANTS.value:
    if name.startswith("conv_map"):
      out[name] = chunked(int(name[len("conv_map"):]))
  return {k: v for k, v in out.items() if k in _VARIANTS.value}


def _run_here() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  b = _BATCH.value
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} batch {b}, GFLOP/s (median of "
        f"{_ROUNDS.value} interleaved rounds); rel. difference to conv", flush=True)
  for size, cin, cout, s in SHAPES:
    a = rng.randn(b, size, size, cin).astype(np.float32)
    w = (rng.randn(3, 3, cin, cout) / np.sqrt(9 * cin)).astype(np.float32)
    x, y = jnp.asarray(a), jnp.asarray(w)
    runs, outs = {}, {}
    for name, fn in _variants().items():
      f = jax.jit(lambda x, y, fn=fn: fn(x, y, s))
      outs[name] = np.asarray(f(x, y))
      runs[name] = lambda f=f: f(x, y).block_until_ready()
    ta = torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).contiguous(
        memory_format=torch.channels_last)
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).contiguous(
        memory_format=torch.channels_last)

    def torch_cl():
      with torch.inference_mode():
        torch.nn.functional.conv2d(ta, tw, stride=s, padding=1)
    torch_cl()
    runs["torch_cl"] = torch_cl
    times = {k: [] for k in runs}
    load = os.getloadavg()[0]
    for _ in range(_ROUNDS.value):
      for k, run in runs.items():
        start = time.perf_counter()
        run()
        times[k].append(time.perf_counter() - start)
    ho = (size - 1) // s + 1
    flops = 2.0 * b * ho * ho * cin * cout * 9
    ref = outs.get("conv")
    diff = {k: float(np.abs(o - ref).max() / np.abs(ref).max()) for k, o in outs.items()
            } if ref is not None else {}
    print(f"{size}x{size} {cin}->{cout} /{s}: " + ", ".join(
        f"{k} {flops / statistics.median(t) / 1e9:.1f}" for k, t in times.items()) +
          " | diff " + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()) +
          f" | load {load:.1f}", flush=True)


def main(argv):
  del argv
  if not _XLA_FLAGS.value:
    _run_here()
    return
  for value in _XLA_FLAGS.value:
    env = dict(os.environ, XLA_FLAGS="" if value == "default" else value)
    args = [a for a in sys.argv[1:] if not a.startswith("--xla_flags")]
    subprocess.run([sys.executable, os.path.abspath(__file__)] + args, env=env, check=False)


if __name__ == "__main__":
  app.run(main)
