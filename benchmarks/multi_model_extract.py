"""Many models, one decode pass (issue 14, section 1).

Three random-init backbones (ResNet-18, ViT-S/16, EfficientNet-Lite0) sharing
one preprocessing (``imagenet_bilinear`` at a small resolution, so that the
JPEG decode, whose cost does not depend on the output size, is a large share)
on the real ImageNet samples: three ``extract`` runs vs one ``extract_many``
pass (no cache, compiled beforehand). Also the host decode alone (the feature
pipeline with no device) and each model's forward pass alone (jitted, on a
batch already on device, same number of steps), to split the time.

  .venv/bin/python benchmarks/multi_model_extract.py --images ../shared/data/imagenet_samples \\
      --num_images 1000 --size 32
"""

import argparse
import json
import os
import resource
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from sslbench_jax import parallel  # pylint: disable=wrong-import-position
from sslbench_jax.backbones import registry  # pylint: disable=wrong-import-position
from sslbench_jax.data import preprocess  # pylint: disable=wrong-import-position
from sslbench_jax.features import _pipeline  # pylint: disable=wrong-import-position
from sslbench_jax.features import extract as extract_lib  # pylint: disable=wrong-import-position
from sslbench_jax.features import image_folder  # pylint: disable=wrong-import-position

ARCHS = "efficientnet_lite0,vit_small_patch16,resnet18"


def _cpu() -> float:
  """CPU seconds of this process (all threads: XLA's and the decode threads);
  steadier than wall time on a machine shared with other jobs."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", default="../shared/data/imagenet_samples")
  p.add_argument("--num_images", type=int, default=1000)
  p.add_argument("--size", type=int, default=64, help="crop size (resize = 8/7 of it)")
  p.add_argument("--batch_size_per_device", type=int, default=50)
  p.add_argument("--num_threads", type=int, default=2)
  p.add_argument("--decode_backend", default="threads")
  p.add_argument("--archs", default=ARCHS)
  a = p.parse_args()
  folder = image_folder.ImageFolder(a.images)
  folder.files = folder.files[:a.num_images]
  preset = preprocess.get_preset("imagenet_bilinear", resize=a.size * 8 // 7, crop=a.size)
  specs = []
  for arch in a.archs.split(","):
    model = registry.create_model(arch)
    variables = jax.tree.map(np.asarray, model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, a.size, a.size, 3))))
    specs.append(extract_lib.ModelSpec(model, variables, meta={"arch": arch}))
  kw = dict(batch_size_per_device=a.batch_size_per_device, num_threads=a.num_threads,
            progress=False, decode_backend=a.decode_backend)

  # Compile every forward pass (same batch shape as the timed runs).
  warm = image_folder.ImageFolder(a.images)
  warm.files = warm.files[:a.batch_size_per_device * jax.device_count()]
  extract_lib.extract_many(specs, warm, preset, **kw)

  out = {"num_images": len(folder), "size": a.size, "devices": jax.device_count(),
         "load_average_start": os.getloadavg()}
  t, c = time.perf_counter(), _cpu()
  separate = {}
  for s in specs:
    t1, c1 = time.perf_counter(), _cpu()
    r = extract_lib.extract(s.model, s.variables, folder, preset, meta=s.meta, **kw)
    separate[s.meta["arch"]] = {"seconds": time.perf_counter() - t1,
                                "cpu_seconds": _cpu() - c1, "input": r.stats.input}
  out["separate_seconds"] = time.perf_counter() - t
  out["separate_cpu_seconds"] = _cpu() - c
  out["separate"] = separate
  t, c = time.perf_counter(), _cpu()
  many = extract_lib.extract_many(specs, folder, preset, **kw)
  out["one_pass_seconds"] = time.perf_counter() - t
  out["one_pass_cpu_seconds"] = _cpu() - c
  out["one_pass_input"] = many[0].stats.input
  for s, r in zip(specs, many):   # the one pass computed the same features
    alone = extract_lib.extract(s.model, s.variables, warm, preset, **kw)
    np.testing.assert_array_equal(r.features.features[:len(warm)],
                                  alone.features.features)

  # Decode alone: the same pipeline, no device.
  load = _pipeline.example_loader(folder, preset.geometry)
  rows = a.batch_size_per_device * jax.device_count()
  steps = -(-len(folder) // rows)
  pos = np.full(steps * rows, -1)
  pos[:len(folder)] = np.arange(len(folder))
  pos = pos.reshape(steps, rows)
  first = load(0)[0]
  t, c = time.perf_counter(), _cpu()
  for _ in _pipeline.device_batches(range(steps), lambda s: pos[s], load, first.shape,
                                    first.dtype, lambda x: x, a.num_threads,
                                    decode_backend=a.decode_backend):
    pass
  out["decode_only_seconds"] = time.perf_counter() - t
  out["decode_only_cpu_seconds"] = _cpu() - c

  # Each forward pass alone on a batch already on device, `steps` times.
  fwd, fwd_cpu = {}, {}
  for s in specs:
    f = extract_lib._Forward(s.model, s.variables, "pre_logits", "float32",  # pylint: disable=protected-access
                             (tuple(preset.config.mean), tuple(preset.config.std)),
                             parallel.make_mesh(),
                             first.shape, first.dtype)
    x = f.to_device(np.zeros((rows,) + first.shape, first.dtype))
    jax.block_until_ready(f(x))
    t, c = time.perf_counter(), _cpu()
    for _ in range(steps):
      y = f(x)
    jax.block_until_ready(y)
    fwd[s.meta["arch"]] = time.perf_counter() - t
    fwd_cpu[s.meta["arch"]] = _cpu() - c
  out["forward_only_seconds"] = fwd
  out["forward_only_cpu_seconds"] = fwd_cpu
  out["load_average_end"] = os.getloadavg()
  d, f_sum = out["decode_only_seconds"], sum(fwd.values())
  out["speedup_measured"] = out["separate_seconds"] / out["one_pass_seconds"]
  # Pipelined model (decode overlaps the forward passes): k runs cost
  # sum_i max(D, F_i); one pass costs max(D, sum_i F_i).
  out["speedup_model"] = sum(max(d, v) for v in fwd.values()) / max(d, f_sum)
  out["speedup_measured_cpu"] = out["separate_cpu_seconds"] / out["one_pass_cpu_seconds"]
  # Where decode dominates (an accelerator: F_i << D), k runs cost ~k D.
  out["speedup_decode_bound"] = len(specs)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
