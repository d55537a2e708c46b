"""Peak memory of a kNN search whose screen falls back to the float32 search.

Issue 10: with a large ``--query_chunk`` the fallback searched the bank (split
for the screen's small query chunk, one shard per device) with the user's
chunk, a (chunk, 50k) float32 block of 1.6 GB. Run under ``/usr/bin/time -v``
and read "Maximum resident set size":

  /usr/bin/time -v .venv/bin/python benchmarks/knn_fallback_memory.py \\
      --query_chunk 8192 [--screen false]

Random Gaussian 768-d rows: similarities crowd within the bfloat16 error, so
the screen certifies few queries of the first chunk and the float32 search
answers all of them (the log says "using the float32 search").
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # pylint: disable=wrong-import-position

from sslbench_jax.probes import knn  # pylint: disable=wrong-import-position


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n_train", type=int, default=50_000)
  p.add_argument("--n_test", type=int, default=8192)
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--query_chunk", type=int, default=8192)
  p.add_argument("--screen", choices=["auto", "true", "false"], default="auto")
  a = p.parse_args()
  rng = np.random.default_rng(0)
  xtr = rng.normal(size=(a.n_train, a.dim)).astype(np.float32)
  xte = rng.normal(size=(a.n_test, a.dim)).astype(np.float32)
  screen = {"auto": None, "true": True, "false": False}[a.screen]
  t = time.perf_counter()
  _, idx = knn.neighbours(xtr, xte, 20, query_chunk=a.query_chunk, screen=screen,
                          progress=False)
  print(f"{a.n_test} queries x {a.n_train} rows, query_chunk {a.query_chunk}, "
        f"screen {a.screen}: {time.perf_counter() - t:.1f} s, checksum "
        f"{int(idx[:, 0].astype(np.int64).sum())}")


if __name__ == "__main__":
  main()
