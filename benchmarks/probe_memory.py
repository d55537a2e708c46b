"""Per-device memory of the linear probe's training features (issue 14, section 2).

Trains a few heads on a synthetic (N, D) float32 set over 8 forced CPU
devices, features resident (sharded, 1/8 of the rows per device) and streamed
from the host under a device budget, and reports per device the peak bytes
of live JAX buffers (``jax.live_arrays()`` shards, sampled every 20 ms while
training; CPU devices give no ``memory_stats()``). Temporaries inside the
jitted step are not live arrays; they are one step's gathered rows (about
cap x D x 4 bytes per device, printed) and the heads' activations.

  .venv/bin/python benchmarks/probe_memory.py                 # 200k x 2048
  .venv/bin/python benchmarks/probe_memory.py --n 20000 --replicated  # + the old layout

``--replicated`` also measures a replicated ``device_put`` of the features,
which is what the probe did before (every device held all N rows); it needs
devices x the feature bytes of RAM, so use a small ``--n``.
"""

import argparse
import json
import os
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from sslbench_jax import parallel  # pylint: disable=wrong-import-position
from sslbench_jax.probes import linear  # pylint: disable=wrong-import-position


class _PeakSampler:
  """Peak over time of the live-buffer bytes on each device."""

  def __init__(self):
    self.peak = {d: 0 for d in jax.devices()}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def sample(self):
    now = {d: 0 for d in jax.devices()}
    seen = set()  # a shard's .data is itself a live array on the same buffer
    for a in jax.live_arrays():
      try:
        for s in a.addressable_shards:
          key = (s.device, s.data.unsafe_buffer_pointer())
          if key not in seen:
            seen.add(key)
            now[s.device] += s.data.nbytes
      except Exception:  # deleted (donated) while being read
        pass
    for d, v in now.items():
      self.peak[d] = max(self.peak[d], v)

  def _run(self):
    while not self._stop.is_set():
      self.sample()
      time.sleep(0.02)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.sample()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=200_000)
  p.add_argument("--dim", type=int, default=2048)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--batch_size", type=int, default=1024)
  p.add_argument("--budget_mb", type=float, default=32.0,
                 help="device budget of the streamed run")
  p.add_argument("--replicated", action="store_true")
  a = p.parse_args()
  assert jax.device_count() == 8, jax.device_count()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((a.n, a.dim), dtype=np.float32)
  y = rng.integers(0, a.classes, a.n)
  feature_bytes = x.nbytes
  configs = linear.grid(["x"], [0.1, 1.0], [0.0], batchnorm=[False])
  tc = linear.TrainConfig(epochs=a.epochs, batch_size=a.batch_size, warmup_epochs=0)
  out = {"n": a.n, "dim": a.dim, "devices": 8, "feature_mb": feature_bytes / 2**20,
         "one_eighth_mb": feature_bytes / 8 / 2**20,
         "step_rows_mb": -(-a.batch_size // 8) * 1.3 * a.dim * 4 / 2**20}
  weights = {}
  for mode, budget in (("resident", None), ("streamed", int(a.budget_mb * 2**20))):
    t = time.perf_counter()
    with _PeakSampler() as s:
      heads = linear.train({"x": x}, y, a.classes, configs, tc, progress=False,
                           device_budget_bytes=budget)
    weights[mode] = heads.weights
    out[mode] = {"peak_live_mb_per_device_max": max(s.peak.values()) / 2**20,
                 "peak_live_mb_per_device_min": min(s.peak.values()) / 2**20,
                 "seconds": time.perf_counter() - t}
  out["streamed_vs_resident_max_abs_weight_diff"] = float(max(
      np.abs(u - v).max() for u, v in zip(weights["resident"], weights["streamed"])))
  if a.replicated:
    with _PeakSampler() as s:
      rep = jax.device_put(x, parallel.replicated(parallel.make_mesh()))
      s.sample()
      del rep
    out["replicated_put"] = {"peak_live_mb_per_device_max": max(s.peak.values()) / 2**20}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
