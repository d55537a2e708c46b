"""Host decode throughput: thread vs process workers (issue 14, section 4).

Decodes JPEGs with the feature pipeline (``features._pipeline.device_batches``:
JPEG decode + resize + center crop to uint8 224x224, batches stacked in step
order) with no device at the end (``to_device`` is the identity), for each
(backend, workers) case, round-robin over ``--repeats`` so that load from other
jobs hits every case alike; reports the median images/s, and the pool start-up
(process fork) separately.

  .venv/bin/python benchmarks/decode_workers.py --images ../shared/data/imagenet_samples \\
      --num_images 400 --repeats 3
"""

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np

from sslbench_jax.data import preprocess
from sslbench_jax.features import _pipeline
from sslbench_jax.features import image_folder


def _run(load, n, rows, backend, workers):
  steps = -(-n // rows)
  pos = np.full(steps * rows, -1)
  pos[:n] = np.arange(n)
  pos = pos.reshape(steps, rows)
  first = load(0)[0]
  self0 = resource.getrusage(resource.RUSAGE_SELF)
  kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  it = _pipeline.device_batches(range(steps), lambda s: pos[s], load, first.shape,
                                first.dtype, lambda x: x, workers, depth=2,
                                decode_backend=backend)
  got = 0
  t_first = None
  for b in it:
    if t_first is None:
      t_first = time.perf_counter()
    got += int(b.keep.sum())
  t1 = time.perf_counter()
  assert got == n
  # CPU seconds per image: this process (decode threads, or the consumer's
  # IPC + copy from shared memory) and the worker processes (reaped at exit).
  self1 = resource.getrusage(resource.RUSAGE_SELF)
  kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = lambda a, b: (b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime)
  return n / (t1 - t0), cpu(self0, self1) / n, cpu(kids0, kids1) / n


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", default="../shared/data/imagenet_samples")
  p.add_argument("--num_images", type=int, default=400)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--cases", default="threads:1,threads:2,processes:1,processes:2")
  a = p.parse_args()
  folder = image_folder.ImageFolder(a.images)
  folder.files = folder.files[:a.num_images]
  geometry = preprocess.get_preset("imagenet_bilinear").geometry
  load = _pipeline.example_loader(folder, geometry)
  cases = [(c.split(":")[0], int(c.split(":")[1])) for c in a.cases.split(",")]
  # Start-up cost of a process pool (fork + ready handshake), timed alone.
  startup = []
  for _ in range(3):
    t = time.perf_counter()
    ring = _pipeline._ProcessDecoder(load, 2, 1, (224, 224, 3), np.uint8)  # pylint: disable=protected-access
    startup.append(time.perf_counter() - t)
    ring.close()
  _run(load, min(64, len(folder)), a.batch, "threads", 1)  # warm the page cache
  rates = {c: [] for c in cases}
  cpu = {c: [] for c in cases}
  for _ in range(a.repeats):
    for c in cases:
      r, own, kids = _run(load, len(folder), a.batch, *c)
      rates[c].append(r)
      cpu[c].append((own, kids))
  base = statistics.median(rates[("threads", 1)]) if ("threads", 1) in rates else None
  print(f"load average: {os.getloadavg()}")
  print(f"process pool start-up (2 workers): median {statistics.median(startup):.3f} s")
  print("| backend | workers | images/s (median) | min | max | / 1 thread | "
        "main-process CPU ms/image | worker-process CPU ms/image |")
  print("|---|---|---|---|---|---|---|---|")
  for c, r in rates.items():
    m = statistics.median(r)
    own = statistics.median(x[0] for x in cpu[c]) * 1e3
    kids = statistics.median(x[1] for x in cpu[c]) * 1e3
    rel = f"{m / base:.2f}" if base else "-"
    print(f"| {c[0]} | {c[1]} | {m:.1f} | {min(r):.1f} | {max(r):.1f} | {rel} | "
          f"{own:.2f} | {kids:.2f} |")
  print(json.dumps({f"{b}:{w}": r for (b, w), r in rates.items()}))


if __name__ == "__main__":
  main()
