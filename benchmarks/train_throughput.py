"""Training-step throughput: the JAX fine-tuning step versus an equivalent PyTorch loop.

One training step = forward + backward + global-norm clip + SGD momentum
update on a fixed uint8 batch already in memory (normalised inside the step),
the ``full`` protocol's step (``sslbench_jax.finetune.step``): softmax cross
entropy with label smoothing 0.1 in float32, clip 0.5. PyTorch: the reference
modules of ``tests/`` (torchvision-layout ResNet-50, timm-layout ViT-S/16)
with a Linear head, ``CrossEntropyLoss(label_smoothing=0.1)``,
``clip_grad_norm_``, ``torch.optim.SGD(momentum=0.9)``; bfloat16 = float32
parameters with bfloat16 compute (JAX: ``dtype=bfloat16`` modules; torch:
``torch.autocast("cpu", torch.bfloat16)``), loss in float32 on both sides.

Implementations are timed interleaved (one step of each per round), the
median over rounds is reported with the load average. Also measured: the
host input pipeline (JPEG decode + RandomResizedCrop + flip to uint8 224x224,
``finetune.input``'s per-example work) in images/s with 2 threads, to say
whether it keeps up with the step; and the peak resident memory of a ViT-B/16
fine-tuning process (batch 32, float32, 224x224, two steps) in a subprocess.

Usage::

  .venv/bin/python benchmarks/train_throughput.py [--rounds 3] [--quick] \
      [--batch 32] [--configs resnet50:float32,resnet50:bfloat16] [--memory_batch 32]

Writes/updates the ``## Training-step throughput`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import re
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

import _timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

_ROUNDS = flags.DEFINE_integer("rounds", 3, "timed rounds per config")
_QUICK = flags.DEFINE_bool("quick", False, "ViT-S/16 float32 only")
_BATCH = flags.DEFINE_integer("batch", 32, "batch size")
_OUTPUT = flags.DEFINE_string("output", os.path.join(ROOT, "BENCHMARKS.md"), "markdown file")
_CONFIGS = flags.DEFINE_list("configs", None, "arch:dtype pairs to time (default: "
                             "resnet50 and vit_small_patch16 x float32, bfloat16)")
_MEMORY_BATCH = flags.DEFINE_integer("memory_batch", 32, "batch of the ViT-B/16 memory "
                                     "probe (0: skip it)")
_CHILD = flags.DEFINE_string("memory_child", None, "internal: run the ViT-B/16 memory probe")
_SAMPLES = os.path.join(ROOT, "..", "shared", "data", "imagenet_samples")
SECTION = "## Training-step throughput"


def _jax_step(arch, dtype_name, batch):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from sslbench_jax import parallel  # pylint: disable=import-outside-toplevel
  from sslbench_jax.finetune import model as model_lib, optim, recipes, step as step_lib  # pylint: disable=import-outside-toplevel
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
  r = recipes.recipe("full", "resnet", epochs=2, batch_size=batch, label_smoothing=0.1)
  model = model_lib.build(arch, 1000, dtype=dtype)
  variables = jax.device_get(model_lib.init_variables(
      model.clone(backbone=model.backbone.clone(dtype=jnp.float32)), 0))
  tx = optim.make_optimizer(r, arch, variables["params"], 10)
  steps = step_lib.Steps(model, r, tx, parallel.make_mesh(), (0.485, 0.456, 0.406),
                         (0.229, 0.224, 0.225), dtype)
  state = [steps.init_state(variables)]
  rs = np.random.RandomState(0)
  x = jax.device_put(rs.randint(0, 256, (batch, 224, 224, 3)).astype(np.uint8), steps.data)
  y = jax.device_put(rs.randint(0, 1000, batch).astype(np.int32), steps.data)
  def run():
    state[0], loss = steps.train(state[0], x, y)
    loss.block_until_ready()
  return run


def _torch_step(arch, dtype_name, batch):
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torch_resnet  # pylint: disable=import-outside-toplevel
  import torch_vit  # pylint: disable=import-outside-toplevel
  if arch == "resnet50":
    backbone, dim = torch_resnet.resnet("resnet50"), 2048
    feats = backbone.features
  else:
    backbone, dim = torch_vit.VisionTransformer(16, 384, 12, 6), 384
    feats = lambda x: backbone(x)["pre_logits"]
  head = torch.nn.Linear(dim, 1000)
  params = list(backbone.parameters()) + list(head.parameters())
  opt = torch.optim.SGD(params, lr=0.0125, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
  backbone.train()
  rs = np.random.RandomState(0)
  x = torch.from_numpy(rs.randint(0, 256, (batch, 224, 224, 3)).astype(np.uint8))
  y = torch.from_numpy(rs.randint(0, 1000, batch).astype(np.int64))
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  def run():
    xt = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype_name == "bfloat16"):
      logits = head(feats(xt))
    loss = loss_fn(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    opt.step()
  return run


def _input_rate(threads: int = 2, n: int = 64) -> float | None:
  from sslbench_jax.data import augment, images  # pylint: disable=import-outside-toplevel
  files = sorted(glob.glob(os.path.join(_SAMPLES, "**", "*.JPEG"), recursive=True))[:n]
  if not files:
    return None
  aug = augment.make_train_augment("imagenet_bilinear", pre_resize=256)
  def one(i):
    with open(files[i], "rb") as f:
      data = f.read()
    return aug.geometry(images.to_pil(data, files[i]), seed=0, epoch=0, index=i)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(one, range(min(8, len(files)))))
    t = time.perf_counter()
    list(pool.map(one, range(len(files))))
  return len(files) / (time.perf_counter() - t)


def _memory_child(batch: int) -> None:
  run = _jax_step("vit_base_patch16", "float32", batch)
  run()
  run()
  print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def _machine() -> str:
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  return (f"{_timing.cpu_name()} ({os.cpu_count()} cores, {jax.devices()[0].platform}), "
          f"jax {jax.__version__}, torch {torch.__version__}")


def main(argv):
  del argv
  if _CHILD.value:
    _memory_child(int(_CHILD.value))
    return
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  b = _BATCH.value
  configs = [("vit_small_patch16", "float32")] if _QUICK.value else [
      (a, d) for a in ("resnet50", "vit_small_patch16") for d in ("float32", "bfloat16")]
  if _CONFIGS.value:
    configs = [tuple(c.split(":")) for c in _CONFIGS.value]
  load0 = os.getloadavg()
  rows = []
  for arch, dt in configs:
    sec = _timing.interleaved_medians({"jax": _jax_step(arch, dt, b),
                                       "torch": _torch_step(arch, dt, b)},
                                      _ROUNDS.value, warmup=True)
    j, t = b / sec["jax"], b / sec["torch"]
    rows.append((arch, dt, j, t))
    print(f"{arch} {dt}: jax {j:.2f} img/s, torch {t:.2f} img/s, ratio {j / t:.2f}", flush=True)
  load1 = os.getloadavg()
  rate = _input_rate()
  mem = None
  mb = _MEMORY_BATCH.value
  if mb:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--memory_child={mb}"],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    found = re.findall(r'\{"maxrss_kb": (\d+)\}', out.stdout)
    if found:
      mem = int(found[-1]) / 1024 ** 2
  lines = [SECTION, "",
           "`benchmarks/train_throughput.py`: images/s of one fine-tuning step (forward +",
           "backward + clip + SGD momentum update, label smoothing 0.1, float32 loss) at",
           f"224x224, batch {b}, JAX (`finetune.step`, jit) vs an equivalent PyTorch eager loop",
           "(tests' reference modules; bfloat16 = float32 parameters with bfloat16 compute,",
           "torch via autocast); timed interleaved, median of "
           f"{_ROUNDS.value} rounds after a warm-up step.", "",
           f"Machine: {_machine()}; shared with other jobs: load average "
           f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end (2 cores), so absolute",
           "numbers are low and noisy; the ratio is the number to read.", "",
           "| model | compute | JAX images/s | PyTorch images/s | JAX / PyTorch |",
           "|---|---|---|---|---|"]
  lines += [f"| {a} | {d} | {j:.2f} | {t:.2f} | {j / t:.2f} |" for a, d, j, t in rows]
  lines.append("")
  if rate is not None:
    best = max(j for _, _, j, _ in rows)
    lines.append(f"Input pipeline: JPEG decode + Resize(256) + RandomResizedCrop(224) + flip "
                 f"to uint8 on 2 threads: {rate:.0f} images/s on the real ImageNet samples, "
                 f"{rate / best:.0f}x the fastest training step above: it keeps up on this "
                 "CPU (an accelerator needs proportionally more host threads).")
  if mb and mem is not None:
    lines.append("")
    lines.append(f"Peak memory of ViT-B/16 full fine-tuning (batch {mb}, float32, 224x224, "
                 f"SGD momentum, two steps; the process's max RSS incl. JAX runtime): "
                 f"{mem:.2f} GiB.")
  elif mb:
    lines.append("")
    why = "killed by SIGKILL (out of memory?)" if out.returncode == -9 else \
        f"exit code {out.returncode}"
    lines.append(f"ViT-B/16 memory probe (batch {mb}) failed: {why}; "
                 f"stderr {out.stderr[-300:]!r}")
  section = "\n".join(lines) + "\n"
  print(section)
  _timing.write_section(_OUTPUT.value, SECTION, section)


if __name__ == "__main__":
  app.run(main)
