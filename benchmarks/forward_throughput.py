"""Forward-pass throughput: JAX (jit) versus PyTorch on the same weights.

For ResNet-50, ViT-S/16 and ViT-B/16 at 224x224, batch 32 and 128, float32
and bfloat16, measures images/s of

* JAX: the project's Flax backbone under ``jax.jit``, warmed up (compiled);
* PyTorch eager, and eager with ``channels_last`` (ResNet only: ViT has one
  conv), with the plain-PyTorch reference modules of ``tests/``;
* ``torch.compile`` (inductor) where it works; its failure reason is recorded.

Both sides get the same weights: the torch module is randomised (non-trivial
BatchNorm statistics), saved to a ``.pth`` and converted with
``convert_checkpoint``. bfloat16 means bfloat16 computation: Flax modules with
``dtype=bfloat16`` (float32 parameters cast at use) on bfloat16 inputs; torch
modules cast to bfloat16 with bfloat16 inputs.

The machine may be shared, so the implementations are measured interleaved
(one timed call of each per round), the median over rounds is reported, and
the ratio JAX/PyTorch is the number to read. "Fraction of peak" divides the
model's FLOPs (XLA's cost analysis of the jitted forward) times images/s by
the best rate of a large square matmul of the same dtype (max over JAX and
PyTorch) timed in the same interleaved rounds: a measured, not a datasheet,
peak, taken under the same load as the model.

Before the models it times the single ops the backbones are made of
(``--micro``): dots at ViT-S/16 shapes and convolutions at ResNet-50 shapes,
batch 32, as float32, as bfloat16 with a bfloat16 result (``lax`` default),
as bfloat16 with float32 accumulation (the path ``backbones/_precision.py``
takes in bfloat16: ``preferred_element_type=float32``, 1x1 and patch convs as
one dot), and PyTorch's float32/bfloat16 ops, all interleaved.

ResNet's JAX column is the backbone as shipped (eval batches on one CPU device
in chunks of 8-16 images, ``backbones/_chunking.py``); ``--whole_batch`` (default on) also
times it with ``eval_chunk=0`` in the same rounds, the gain of the chunking.

The load average (1 min) is recorded before and after each config. In full
mode on CPU it also runs JAX in subprocesses with XLA:CPU flag variants that
could change the bfloat16 speed (oneDNN, XNNPACK, thunk runtime).

Usage::

  .venv/bin/python benchmarks/forward_throughput.py            # full
  .venv/bin/python benchmarks/forward_throughput.py --quick    # a few configs
  # float32 at batch 128 only, printed, BENCHMARKS.md untouched:
  .venv/bin/python benchmarks/forward_throughput.py --models resnet50,vit_small_patch16 \
      --batches 128 --dtypes float32 --micro=false --xla_sweep=false --output=

Writes/updates the ``## Forward pass throughput`` section of BENCHMARKS.md
(atomic rewrite; other sections are kept). Runs unchanged on GPU/TPU (torch
uses CUDA when available; the XLA:CPU sweep is skipped off CPU).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _timing  # pylint: disable=g-import-not-at-top,wrong-import-position

_QUICK = flags.DEFINE_bool("quick", False, "RN50 + ViT-S/16 at batch 32 only, no torch.compile, "
                           "no XLA flag sweep; at least 5 rounds.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds per config (fewer when a call is slow).")
_CONFIG_BUDGET = flags.DEFINE_float(
    "config_budget_s", 25.0, "Timed seconds allowed per implementation and config; "
    "rounds are cut to fit (at least 1).")
_MODELS = flags.DEFINE_list("models", ["resnet50", "vit_small_patch16", "vit_base_patch16"],
                           "Architectures (full mode).")
_BATCHES = flags.DEFINE_list("batches", ["32", "128"], "Batch sizes (full mode).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_MICRO = flags.DEFINE_bool("micro", True, "Time the single dots/convs first (see docstring).")
_COMPILE = flags.DEFINE_bool("torch_compile", True, "Also time torch.compile (batch 32 only).")
_SWEEP = flags.DEFINE_bool("xla_sweep", True, "Run the XLA:CPU flag sweep (CPU, full mode only).")
_OUTPUT = flags.DEFINE_string("output", os.path.join(ROOT, "BENCHMARKS.md"),
                              "Markdown file whose section is written; empty: print only.")
_WHOLE = flags.DEFINE_bool(
    "whole_batch", True, "ResNet: also time JAX with eval_chunk=0 (the whole batch in one "
    "pass, as before backbones/_chunking.py), in the same interleaved rounds.")
_CHILD = flags.DEFINE_string("child", "", "Internal: JSON config to time in a subprocess.")

SECTION = "## Forward pass throughput"
MODELS = {
    "resnet50": "RN50",
    "vit_small_patch16": "ViT-S/16",
    "vit_base_patch16": "ViT-B/16",
}
# XLA:CPU flags that exist in jaxlib 0.10.2 (checked: an unknown flag aborts at
# start-up; --xla_cpu_use_mkl_dnn is gone) and plausibly touch bf16 dots/convs.
XLA_VARIANTS = (
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT,"
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,"
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "--xla_cpu_use_thunk_runtime=false",
)
SWEEP_BATCH = 32
IMAGE = 224


def _jax():
  import jax  # pylint: disable=g-import-not-at-top
  return jax


def _sync_torch(torch, device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


# --------------------------------------------------------------------------- models


def _torch_model(arch: str):
  """Random torch reference module (eval mode) for ``arch``."""
  import torch_resnet  # pylint: disable=g-import-not-at-top
  import torch_vit  # pylint: disable=g-import-not-at-top
  if arch == "resnet50":
    return torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed=0)
  from sslbench_jax.backbones import registry  # pylint: disable=g-import-not-at-top
  cfg = registry.create_model(arch)
  model = torch_vit.VisionTransformer(patch_size=cfg.patch_size, width=cfg.width,
                                      depth=cfg.depth, num_heads=cfg.num_heads)
  return model.randomize_(0).eval()


def _convert(torch, model, arch: str, workdir: str):
  """Same weights in Flax: save the torch state dict, convert it from disk."""
  from sslbench_jax.convert.converter import convert_checkpoint  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, f"{arch}.pth")
  torch.save(model.state_dict(), path)
  variables, meta = convert_checkpoint(path, arch)
  os.remove(path)
  return variables, meta["arch_options"]


def _jax_forward(arch: str, options: dict[str, Any], dtype_name: str, variables, batch: int):
  """(callable running one forward to completion, FLOPs per image)."""
  jax = _jax()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sslbench_jax.backbones import registry  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
  model = registry.create_model(arch, **dict(options, dtype=dtype))
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False)["pre_logits"])
  images = jnp.asarray(np.random.RandomState(0).randn(batch, IMAGE, IMAGE, 3), dtype)
  variables = jax.device_put(variables)
  compiled = fn.lower(variables, images).compile()
  # FLOPs of one image (XLA's cost analysis of the lowered graph): at the
  # full batch a chunked backbone's lax.map body would be counted once.
  cost = fn.lower(variables, images[:1]).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  run = lambda: compiled(variables, images).block_until_ready()
  run()  # warm-up
  return run, flops


def _torch_variants(torch, model, dtype_name: str, batch: int, device: str,
                    arch: str, with_compile: bool) -> tuple[dict[str, Callable], dict[str, str]]:
  """name -> callable for each torch variant that works; notes (compile time or
  the reason torch.compile failed)."""
  dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
  model = model.to(device=device, dtype=dtype).eval()
  images = torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
  images = images.to(device=device, dtype=dtype)
  variants: dict[str, Callable] = {}
  notes: dict[str, str] = {}

  def make(module, x):
    def run():
      with torch.inference_mode():
        module(x)
      _sync_torch(torch, device)
    return run

  variants["torch eager"] = make(model, images)
  if arch.startswith("resnet"):
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    variants["torch channels_last"] = make(cl_model, images.contiguous(
        memory_format=torch.channels_last))
  if with_compile:
    try:
      compiled = torch.compile(model)
      run = make(compiled, images)
      start = time.perf_counter()
      run()  # compiles
      variants["torch.compile"] = run
      notes["torch.compile time"] = f"{time.perf_counter() - start:.0f} s"
    except Exception as e:  # pylint: disable=broad-except  # recorded, not fatal
      notes["torch.compile failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
  for name, run in variants.items():
    if name != "torch.compile":
      run()  # warm-up (oneDNN primitive creation)
  return variants, notes


# --------------------------------------------------------------------------- peak


def _matmul_runs(torch, device: str, dtype_name: str) -> tuple[dict[str, Callable], float]:
  """Timed n x n matmuls (JAX and torch) of ``dtype_name``, and their FLOPs.

  They are timed in the same interleaved rounds as the models, so the peak
  they give is measured under the same machine load as the model it divides.
  """
  jax = _jax()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sslbench_jax.backbones import _precision  # pylint: disable=g-import-not-at-top
  n = 4096 if jax.devices()[0].platform != "cpu" else 2048
  a = jnp.ones((n, n), jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32)
  # bfloat16: float32 accumulation, as the backbones run it (_precision).
  mm = _precision.dot_general if dtype_name == "bfloat16" else jax.lax.dot_general
  f = jax.jit(lambda a: mm(a, a, (((1,), (0,)), ((), ()))))
  f(a).block_until_ready()
  t = torch.ones(n, n, dtype=torch.bfloat16 if dtype_name == "bfloat16" else torch.float32,
                 device=device)

  def torch_mm():
    t @ t
    _sync_torch(torch, device)

  torch_mm()
  return {"matmul jax": lambda: f(a).block_until_ready(), "matmul torch": torch_mm}, 2.0 * n ** 3


# --------------------------------------------------------------------------- ops

# (label, kind, shape): dots "m,k,n" at ViT-S/16 batch 32 (6304 tokens), convs
# (batch, size, cin, cout, kernel, stride) at ResNet-50 batch 32.
MICRO_OPS = (
    ("ViT-S qkv", "dot", (6304, 384, 1152)),
    ("ViT-S fc1", "dot", (6304, 384, 1536)),
    ("ViT-S fc2", "dot", (6304, 1536, 384)),
    ("ViT-S attention q.k", "attn", (32 * 6, 197, 64)),
    ("ViT-S patch embed 16x16/16", "conv", (32, 224, 3, 384, 16, 16)),
    ("RN50 stem 7x7/2", "conv", (32, 224, 3, 64, 7, 2)),
    ("RN50 layer1 1x1 256->64", "conv", (32, 56, 256, 64, 1, 1)),
    ("RN50 layer1 3x3 64->64", "conv", (32, 56, 64, 64, 3, 1)),
    ("RN50 layer1 1x1 64->256", "conv", (32, 56, 64, 256, 1, 1)),
    ("RN50 layer3 1x1 1024->256", "conv", (32, 14, 1024, 256, 1, 1)),
    ("RN50 layer3 3x3 256->256", "conv", (32, 14, 256, 256, 3, 1)),
    ("RN50 layer4 3x3 512->512", "conv", (32, 7, 512, 512, 3, 1)),
)
MICRO_COLUMNS = ("JAX float32", "JAX bf16 -> bf16 (lax default)",
                 "JAX bf16, float32 accumulation (backbones)", "torch float32", "torch bf16")


def _micro_op(torch, kind: str, shape: tuple[int, ...]) -> tuple[dict[str, Callable], float]:
  """Callables for each column of ``MICRO_COLUMNS`` and the op's FLOPs."""
  jax = _jax()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  from sslbench_jax.backbones import _precision  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  f32, bf16 = jnp.float32, jnp.bfloat16
  if kind == "dot":
    m, k, n = shape
    a, b = rng.randn(m, k).astype(np.float32), rng.randn(k, n).astype(np.float32)
    dims = (((1,), (0,)), ((), ()))
    plain = lambda x, y: lax.dot_general(x, y, dims)
    fast = lambda x, y: _precision.dot_general(x, y, dims)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch_op = lambda x, y: x @ y
    flops = 2.0 * m * k * n
  elif kind == "attn":
    bh, t, d = shape
    a, b = rng.randn(bh, t, d).astype(np.float32), rng.randn(bh, t, d).astype(np.float32)
    plain = lambda x, y: jnp.einsum("bqd,bkd->bqk", x, y)
    fast = lambda x, y: _precision.einsum("bqd,bkd->bqk", x, y)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch_op = lambda x, y: x @ y.transpose(1, 2)
    flops = 2.0 * bh * t * t * d
  else:
    batch, size, cin, cout, k, s = shape
    a = rng.randn(batch, size, size, cin).astype(np.float32)
    b = (rng.randn(k, k, cin, cout) * 0.1).astype(np.float32)
    # torch-style symmetric padding; none for patch (kernel == stride) convs.
    pad = ((0, 0), (0, 0)) if k == s else ((k // 2, k // 2),) * 2
    dn = lax.conv_dimension_numbers(a.shape, b.shape, ("NHWC", "HWIO", "NHWC"))
    plain = lambda x, y: lax.conv_general_dilated(x, y, (s, s), pad, dimension_numbers=dn)
    fast = lambda x, y: _precision.conv_general_dilated(x, y, (s, s), pad,
                                                        dimension_numbers=dn)
    ta = torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).contiguous(
        memory_format=torch.channels_last)
    tb = torch.from_numpy(b.transpose(3, 2, 0, 1).copy()).contiguous(
        memory_format=torch.channels_last)
    tpad = pad[0][0]
    torch_op = lambda x, y: torch.nn.functional.conv2d(x, y, stride=s, padding=tpad)
    out = (size + 2 * pad[0][0] - k) // s + 1
    flops = 2.0 * batch * out * out * cin * cout * k * k

  def jax_run(fn, dtype):
    f = jax.jit(fn)
    x, y = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    f(x, y).block_until_ready()
    return lambda: f(x, y).block_until_ready()

  def torch_run(dtype):
    x, y = ta.to(dtype), tb.to(dtype)

    def run():
      with torch.inference_mode():
        torch_op(x, y)
    run()
    return run

  runs = dict(zip(MICRO_COLUMNS, (
      jax_run(plain, f32), jax_run(plain, bf16), jax_run(fast, bf16),
      torch_run(torch.float32), torch_run(torch.bfloat16))))
  return runs, flops


def _micro(torch, rounds: int) -> list[dict[str, Any]]:
  """GFLOP/s of each op of ``MICRO_OPS`` per column, median of interleaved rounds."""
  rows = []
  for label, kind, shape in MICRO_OPS:
    runs, flops = _micro_op(torch, kind, shape)
    load = os.getloadavg()[0]
    seconds = _measure(runs, rounds, 20.0)
    row = dict(op=label, shape=shape, load=load,
               gflops={k: flops / t / 1e9 for k, t in seconds.items()})
    print(f"  op {label} {shape}: " + ", ".join(
        f"{k} {v:.0f}" for k, v in row["gflops"].items()) + " GFLOP/s", flush=True)
    rows.append(row)
  return rows


# --------------------------------------------------------------------------- timing


def _measure(runs: dict[str, Callable], rounds: int, budget: float) -> dict[str, float]:
  """Interleaved timing: median seconds per call for each implementation (the
  first round counts; rounds cut to fit ``budget`` seconds per implementation)."""
  return _timing.interleaved_medians(runs, rounds, budget=budget)


def _child_main(spec: dict[str, Any]) -> None:
  """Subprocess: time JAX forwards and a matmul under the inherited XLA_FLAGS."""
  jax = _jax()
  from sslbench_jax.backbones import registry  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  result = {}
  for arch in spec["archs"]:
    model = registry.create_model(arch)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0),
                                    jnp.zeros((1, IMAGE, IMAGE, 3), jnp.float32))
    run, _ = _jax_forward(arch, {}, spec["dtype"], variables, spec["batch"])
    result[arch] = spec["batch"] / _measure({"jax": run}, spec["rounds"], spec["budget"])["jax"]
  n = 2048
  a = jnp.ones((n, n), jnp.bfloat16 if spec["dtype"] == "bfloat16" else jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  result["matmul"] = 2.0 * n ** 3 / min(
      _timing.time_once(lambda: f(a).block_until_ready()) for _ in range(5)) / 1e9
  print("RESULT " + json.dumps(result))


def _sweep(archs: tuple[str, ...], batch: int, dtype: str, rounds: int,
           budget: float) -> list[dict[str, Any]]:
  """One subprocess per XLA flag variant; the default runs first and last."""
  rows = []
  for variant in XLA_VARIANTS + ("",):
    spec = dict(archs=archs, batch=batch, dtype=dtype, rounds=rounds, budget=budget)
    env = dict(os.environ, XLA_FLAGS=variant)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__),
                           "--child=" + json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=1800)
    found = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    row = dict(flags=variant or "(default)")
    if found:
      row.update(json.loads(found.group(1)))
    else:
      row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]
    print(f"  sweep {dtype} b{batch} [{row['flags']}]: {row}", flush=True)
    rows.append(row)
  return rows


# --------------------------------------------------------------------------- report


def _machine() -> dict[str, str]:
  jax = _jax()
  import flax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  model_name = _timing.cpu_name()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    found = re.search(r"^Flags:\s*(.+)$", out, re.M)
    isa = [f for f in (found.group(1).split() if found else [])
           if f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")]
    model_name += f" (lscpu; bf16-relevant flags: {' '.join(isa) or 'none'})"
  except OSError:
    pass
  return {
      "cpu": model_name,
      "cores": str(os.cpu_count()),
      "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind} "
                f"x{jax.device_count()}",
      "versions": f"jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, "
                  f"python {platform.python_version()}",
      "torch_threads": str(torch.get_num_threads()),
  }


def _markdown(machine, results, notes, sweep, micro, wall, quick) -> str:
  lines = [SECTION, "",
           f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
           f"`benchmarks/forward_throughput.py{' --quick' if quick else ''}` "
           f"(wall time {wall / 60:.1f} min).", "",
           f"- Machine: {machine['cpu']}, {machine['cores']} logical cores "
           f"(shared with other jobs: absolute numbers are noisy, read the ratios); "
           f"JAX device {machine['device']}; torch threads {machine['torch_threads']}.",
           f"- Versions: {machine['versions']}.",
           "- Method: forward pass of the backbone (pre-logits) on random 224x224 inputs; "
           "same weights on both sides (torch reference module randomised, saved, converted "
           "with `convert_checkpoint`). JAX: `jax.jit`, compiled and warmed up. PyTorch: "
           "`inference_mode`, one warm-up call. Implementations are timed interleaved, "
           "one call each per round; the median over rounds (up to the `--rounds` flag, fewer "
           "when a call is slow) is reported. bfloat16 = bfloat16 compute on both sides.",
           "- Fraction of peak = XLA cost-analysis FLOPs per image (2 x multiply-adds) x "
           "images/s / a measured peak: the faster of a JAX and a torch 2048x2048 matmul "
           "(4096 on accelerators) of the same dtype, timed in the same interleaved rounds "
           "as the models (column 'matmul peak'), so both see the same machine load; "
           "the JAX bfloat16 matmul accumulates in float32, as the backbones do.",
           "- bfloat16 in the Flax backbones (`backbones/_precision.py`): bfloat16 operands, "
           "float32 accumulation (`preferred_element_type`) rounded once to bfloat16 for every "
           "Dense, attention einsum and convolution; 1x1 convs and the ViT patch embedding run "
           "as one dot; the ViT residual stream stays float32. float32 is unchanged "
           "(bit-identical to flax's defaults).",
           "- ResNet eval batches on one CPU device run as `lax.map` over chunks whose "
           "first-stage activations fit in 32 MB (`backbones/_chunking.py`: RN50 at 224 px, "
           "8 images in float32, 16 in bfloat16; float32 bit-identical to the whole batch); "
           "'JAX whole batch' = the same backbone with `eval_chunk=0`, timed in the same "
           "rounds. 'JAX / best torch' uses the default (chunked) JAX column.",
           "- load = the 1-minute load average before / after the config's timing (2 cores: "
           "a load of 2 is a fully busy machine; above it JAX and torch share the cores "
           "with other jobs, alike because they are interleaved).",
           "",
           "| model | batch | dtype | GFLOPs/img | JAX img/s | JAX whole batch img/s | "
           "torch eager img/s | "
           "torch channels_last img/s | torch.compile img/s | JAX / best torch | "
           "matmul peak GFLOP/s (JAX / torch) | JAX % peak | best torch % peak | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    torch_vals = {k: v for k, v in r["ips"].items() if k.startswith("torch")}
    best = max(torch_vals.values())
    peak = r["peak"]
    fmt = lambda k: f"{r['ips'][k]:.1f}" if k in r["ips"] else "n/a"
    lines.append(
        f"| {MODELS[r['arch']]} | {r['batch']} | {r['dtype']} | {r['flops'] / 1e9:.2f} | "
        f"{fmt('jax')} | {fmt('jax whole batch')} | {fmt('torch eager')} | "
        f"{fmt('torch channels_last')} | "
        f"{fmt('torch.compile')} | {r['ips']['jax'] / best:.2f} | "
        f"{r['peaks']['matmul jax'] / 1e9:.0f} / {r['peaks']['matmul torch'] / 1e9:.0f} | "
        f"{100 * r['flops'] * r['ips']['jax'] / peak:.0f}% | "
        f"{100 * r['flops'] * best / peak:.0f}% | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
  if micro:
    lines += ["", f"Single ops (`--micro`), GFLOP/s, median of interleaved rounds, batch 32; "
              "dots are (tokens x in) @ (in x out) at ViT-S/16 shapes, convs NHWC at "
              "ResNet-50 shapes (torch: `channels_last`):", "",
              "| op | shape | " + " | ".join(MICRO_COLUMNS) + " | load |",
              "|---|---|" + "---|" * (len(MICRO_COLUMNS) + 1)]
    for row in micro:
      lines.append(f"| {row['op']} | {'x'.join(map(str, row['shape']))} | " + " | ".join(
          f"{row['gflops'][k]:.0f}" for k in MICRO_COLUMNS) + f" | {row['load']:.1f} |")
  if notes:
    lines += ["", "torch.compile (inductor, batch 32 only to bound compile time): " + "; ".join(
        f"{k}: {v}" for k, v in notes.items()) + "."]
  if sweep:
    archs = [a for a in MODELS if a in sweep[0]] or list(MODELS)[:2]
    lines += ["", f"XLA:CPU flag variants, bfloat16, batch {SWEEP_BATCH} (JAX only, one "
              "subprocess per variant, run in this order; the default runs first and last "
              "to show the drift; flags present in jaxlib 0.10.2 that could route bf16 "
              "dots/convs to oneDNN/XNNPACK/YNNPACK):", "",
              "| flags | " + " | ".join(f"{MODELS[a]} img/s" for a in archs) +
              " | JAX bf16 matmul GFLOP/s |",
              "|---|" + "---|" * (len(archs) + 1)]
    for row in sweep:
      if "error" in row:
        lines.append(f"| `{row['flags']}` | failed: {row['error']} |" + " |" * len(archs))
        continue
      lines.append(f"| `{row['flags']}` | " + " | ".join(f"{row[a]:.1f}" for a in archs) +
                   f" | {row['matmul']:.0f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if _CHILD.value:
    _child_main(json.loads(_CHILD.value))
    return
  import torch  # pylint: disable=g-import-not-at-top
  jax = _jax()
  start = time.perf_counter()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  quick = _QUICK.value
  rounds = max(_ROUNDS.value, 5) if quick else _ROUNDS.value
  budget = max(_CONFIG_BUDGET.value, 40.0) if quick else _CONFIG_BUDGET.value
  dtypes = tuple(_DTYPES.value)
  if set(dtypes) - {"float32", "bfloat16"}:
    raise app.UsageError(f"--dtypes: expected float32 and/or bfloat16, got {dtypes}")
  archs = ("resnet50", "vit_small_patch16") if quick else tuple(_MODELS.value)
  batches = (32,) if quick else tuple(int(b) for b in _BATCHES.value)
  unknown = [a for a in archs if a not in MODELS]
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
  machine = _machine()
  print(machine, flush=True)
  print(f"configs: {archs} x batch {batches} x {dtypes}", flush=True)
  results, notes = [], {}
  micro = _micro(torch, rounds) if _MICRO.value else []
  with tempfile.TemporaryDirectory() as workdir:
    for arch in archs:
      base = _torch_model(arch)
      variables, options = _convert(torch, base, arch, workdir)
      for batch in batches:
        for dtype in dtypes:
          with_compile = _COMPILE.value and not quick and batch == 32
          runs, config_notes = _torch_variants(torch, copy.deepcopy(base), dtype, batch,
                                               device, arch, with_compile)
          notes.update({f"{MODELS[arch]} {dtype} {k}": v for k, v in config_notes.items()})
          jax_run, flops = _jax_forward(arch, options, dtype, variables, batch)
          jax_runs = {"jax": jax_run}
          if _WHOLE.value and arch.startswith("resnet"):
            # The same backbone with its CPU batch chunking off (_chunking).
            jax_runs["jax whole batch"] = _jax_forward(
                arch, dict(options, eval_chunk=0), dtype, variables, batch)[0]
          mm_runs, mm_flops = _matmul_runs(torch, device, dtype)
          load_before = os.getloadavg()[0]
          seconds = _measure({**jax_runs, **runs, **mm_runs}, rounds, budget)
          load = (load_before, os.getloadavg()[0])
          peaks = {k: mm_flops / seconds.pop(k) for k in mm_runs}
          ips = {k: batch / t for k, t in seconds.items()}
          results.append(dict(arch=arch, batch=batch, dtype=dtype, flops=flops, ips=ips,
                              peak=max(peaks.values()), peaks=peaks, load=load))
          print(f"{MODELS[arch]} b{batch} {dtype}: " + ", ".join(
              f"{k} {v:.1f}" for k, v in ips.items()) + " img/s; " + ", ".join(
                  f"{k} {v / 1e9:.0f}" for k, v in peaks.items()) + " GFLOP/s", flush=True)
          del runs, jax_run, jax_runs
  sweep = []
  if _SWEEP.value and not quick and jax.devices()[0].platform == "cpu":
    sweep = _sweep(("resnet50", "vit_small_patch16"), SWEEP_BATCH, "bfloat16", 2,
                   _CONFIG_BUDGET.value / 2)
  section = _markdown(machine, results, notes, sweep, micro,
                      time.perf_counter() - start, quick)
  print(section)
  if _OUTPUT.value:
    _timing.write_section(_OUTPUT.value, SECTION, section)


if __name__ == "__main__":
  app.run(main)
