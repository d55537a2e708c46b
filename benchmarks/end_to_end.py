"""End-to-end extraction throughput: JPEG on disk -> cached features, vs the forward pass alone.

Three measurements on the same model, batch and images, each the median of
``--repeats`` runs (taken round-robin) after a warm-up that compiles the
forward pass:

* ``forward only``: the jitted, sharded forward pass on a batch already on
  device (uint8 pixels, normalised on device, exactly as extraction runs it);
  the ceiling extraction could reach with a free input pipeline;
* ``decode only``: the host pipeline alone (JPEG decode, resize, crop to uint8)
  on 1, 2, 4 threads;
* ``end to end``: ``features.extract`` from the JPEG files to a fresh on-disk
  cache (shards, checksums, manifest), on 1, 2, 4 decode threads.

If end-to-end tracks ``forward only``, the accelerator is the bottleneck; if it
tracks ``decode only`` at some thread count, the input pipeline is. Runs
unchanged on CPU, GPU and TPU (all local devices, data-parallel).

Usage:
  .venv/bin/python benchmarks/end_to_end.py \\
      --images ../shared/data/imagenet_samples --num_images 256
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import platform
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sslbench_jax import parallel  # pylint: disable=wrong-import-position
from sslbench_jax.backbones import registry  # pylint: disable=wrong-import-position
from sslbench_jax.data import preprocess  # pylint: disable=wrong-import-position
from sslbench_jax.features import cache as cache_lib  # pylint: disable=wrong-import-position
from sslbench_jax.features import extract as extract_lib  # pylint: disable=wrong-import-position
from sslbench_jax.features import image_folder  # pylint: disable=wrong-import-position

_DEFAULT_IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                               "shared", "data", "imagenet_samples")
FLAGS = flags.FLAGS
flags.DEFINE_string("images", _DEFAULT_IMAGES, "folder of JPEGs")
flags.DEFINE_string("arch", "efficientnet_lite0", "registry architecture (random init)")
flags.DEFINE_integer("num_images", 256, "images per run (the first N of the folder)")
flags.DEFINE_integer("batch_size_per_device", 32, "images per device and step")
flags.DEFINE_list("threads", ["1", "2", "4"], "decode thread counts")
flags.DEFINE_integer("repeats", 5, "runs per measurement (the median is reported)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")


class _FirstN:
  """The first ``n`` examples of a source."""

  def __init__(self, source, n):
    self.source, self.n = source, min(n, len(source))

  def __len__(self):
    return self.n

  def get(self, i):
    return self.source.get(i)


def main(argv):
  del argv
  folder = image_folder.ImageFolder(FLAGS.images)
  source = _FirstN(folder, FLAGS.num_images)
  n = len(source)
  model = registry.create_model(FLAGS.arch)
  preset = preprocess.get_preset(registry.default_preprocessing(FLAGS.arch))
  variables = jax.tree.map(np.asarray, model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))
  threads = [int(t) for t in FLAGS.threads]
  bs = FLAGS.batch_size_per_device
  key = cache_lib.CacheKey(arch=FLAGS.arch, arch_options={}, weights_sha256="random-init",
                           dataset=f"folder:{folder.directory}", split=str(n),
                           preprocessing=preset.name, representation="pre_logits",
                           dtype=FLAGS.dtype)

  def extract(num_threads, root, source=source):
    return extract_lib.extract(model, variables, source, preset, dtype=FLAGS.dtype,
                               batch_size_per_device=bs, num_threads=num_threads,
                               cache_root=root, key=key, progress=False)

  # Warm-up: compiles the forward pass (cached for every later call).
  with tempfile.TemporaryDirectory() as root:
    extract(max(threads), root, _FirstN(folder, bs * jax.local_device_count()))

  # Forward only: the same jitted function on one global batch on device.
  mesh = parallel.make_mesh()
  pixels = np.stack([preset.geometry(folder.get(i % len(folder))["image"])
                     for i in range(bs * jax.local_device_count())])
  fwd = extract_lib._Forward(  # pylint: disable=protected-access
      model, variables, "pre_logits", FLAGS.dtype,
      (tuple(preset.config.mean), tuple(preset.config.std)), mesh, pixels.shape[1:],
      pixels.dtype)
  batch = fwd.to_device(pixels)
  fwd(batch).block_until_ready()
  steps = -(-n // len(pixels))

  def forward_only():
    outs = [fwd(batch) for _ in range(steps)]
    jax.block_until_ready(outs)

  def decode_only(t):
    with concurrent.futures.ThreadPoolExecutor(t) as pool:
      list(pool.map(lambda i: preset.geometry(folder.get(i)["image"]), range(n)))

  def end_to_end(t):
    with tempfile.TemporaryDirectory() as root:
      result = extract(t, root)
      assert result.stats.shards_computed == result.stats.num_shards

  cases = [("forward only (batch on device)", "-", forward_only, steps * len(pixels))]
  cases += [("decode only (JPEG -> uint8 224x224)", str(t),
             functools.partial(decode_only, t), n) for t in threads]
  cases += [("end to end (JPEG -> cached features)", str(t),
             functools.partial(end_to_end, t), n) for t in threads]
  # Round-robin over the cases, so load from other jobs on a shared machine
  # hits every case alike instead of skewing whichever ran during a spike.
  rates = {c[0] + c[1]: [] for c in cases}
  load_start = os.getloadavg()[0]
  for _ in range(FLAGS.repeats):
    for name, t, fn, count in cases:
      t0 = time.perf_counter()
      fn()
      rates[name + t].append(count / (time.perf_counter() - t0))
  rows = [(name, t, statistics.median(rates[name + t]), min(rates[name + t]),
           max(rates[name + t])) for name, t, _, _ in cases]

  versions = extract_lib._versions()  # pylint: disable=protected-access
  print(f"\n{FLAGS.arch} (random init), {FLAGS.dtype}, {n} images from "
        f"{os.path.basename(os.path.normpath(FLAGS.images))}, batch "
        f"{bs}/device x {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"median of {FLAGS.repeats} runs\n")
  print(f"machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + "\n")
  forward = rows[0][2]
  print("| measurement | decode threads | images/s (median) | min | max | / forward only |")
  print("|---|---|---|---|---|---|")
  for name, t, med, lo, hi in rows:
    print(f"| {name} | {t} | {med:.1f} | {lo:.1f} | {hi:.1f} | {med / forward:.2f} |")


if __name__ == "__main__":
  app.run(main)
