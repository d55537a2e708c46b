"""``sslbench-jax finetune``: the trained protocols from the command line.

  sslbench-jax finetune --weights W.npz --dataset NAME \
      --protocol linear_aug|full|fewshot [--label_fraction 0.01|0.1] \
      [--epochs N --batch_size B --image_size S --optimizer sgd|adamw \
       --checkpoint_every_steps N] --workdir DIR

Writes ``DIR/metrics.jsonl``, ``DIR/result.json``, ``DIR/checkpoints/`` and
``DIR/tensorboard/`` (``sslbench_jax.finetune.train``). Unset recipe flags
keep the study's values for the protocol and backbone family
(``finetune.recipes``). Re-running on a finished DIR prints its result; on an
interrupted one it resumes. SIGTERM checkpoints and exits 1. Exit codes: 2
bad input (one line naming it, nothing written), 1 runtime failure.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from absl import flags

FLAGS = flags.FLAGS

# Recipe fields settable from flags (None: the protocol's default).
_RECIPE_FLAGS = ("epochs", "batch_size", "lr", "head_lr", "weight_decay",
                 "warmup_epochs", "clip_norm", "label_smoothing", "layer_decay",
                 "drop_path", "head_bn", "frozen_bn", "subset_seed", "seed",
                 "accum_steps", "momentum", "crop_scale_min", "backbone_bn")


def define_flags() -> None:
  """Defines this subcommand's absl flags."""
  flags.DEFINE_string("weights", None, "converted weights .npz (with its .json sidecar)")
  flags.DEFINE_string("dataset", None, "dataset name (trains on train, tests on test)")
  flags.DEFINE_string("data_dir", None, "dataset root, if the dataset needs one")
  flags.DEFINE_enum("protocol", None, ["linear_aug", "full", "fewshot"], "trained protocol")
  flags.DEFINE_float("label_fraction", None, "fewshot: 0.01 or 0.1")
  flags.DEFINE_string("fewshot_setup", None,
                      "fewshot: swav|barlowtwins|byol1|byol2 (default byol2)")
  flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adamw"], "optimizer")
  flags.DEFINE_integer("epochs", None, "training epochs (default: the recipe's)")
  flags.DEFINE_integer("batch_size", None, "global batch (default: the recipe's)")
  flags.DEFINE_float("lr", None, "backbone lr at batch 256 (scaled by batch/256)")
  flags.DEFINE_float("head_lr", None, "head lr at batch 256 (default: --lr)")
  flags.DEFINE_float("weight_decay", None, "weight decay")
  flags.DEFINE_integer("warmup_epochs", None, "warm-up epochs")
  flags.DEFINE_float("clip_norm", None, "global-norm clip")
  flags.DEFINE_float("label_smoothing", None, "label smoothing")
  flags.DEFINE_float("layer_decay", None, "ViT layer-wise lr decay")
  flags.DEFINE_float("drop_path", None, "ViT drop-path rate")
  flags.DEFINE_bool("head_bn", None, "BatchNorm1d before the head")
  flags.DEFINE_enum("frozen_bn", None, ["eval", "update"],
                    "linear_aug: a frozen convnet's BatchNorm mode")
  flags.DEFINE_enum("backbone_bn", None, ["batch", "running"],
                    "full/fewshot: backbone BatchNorm on batch statistics (study) or "
                    "fixed running statistics")
  flags.DEFINE_integer("subset_seed", None, "fewshot subset seed (default 42)")
  flags.DEFINE_integer("seed", None, "head init / data order / augmentation seed")
  flags.DEFINE_integer("accum_steps", None, "gradient accumulation micro-batches")
  flags.DEFINE_float("momentum", None, "SGD momentum")
  flags.DEFINE_float("crop_scale_min", None, "RandomResizedCrop min area fraction (0.08)")
  flags.DEFINE_string("preprocessing", None, "eval preset; default: the architecture's")
  flags.DEFINE_integer("image_size", None, "train / eval crop side (default: the preset's)")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
  flags.DEFINE_enum("param_sharding", "replicated", ["replicated", "fsdp"],
                    "fsdp: parameters and optimizer state split over the mesh's "
                    "model axis (--model_axis_size devices)")
  flags.DEFINE_integer("model_axis_size", 1, "devices of the mesh's model axis")
  flags.DEFINE_integer("checkpoint_every_steps", 500, "checkpoint period (steps)")
  flags.DEFINE_integer("eval_batch_size", 256, "global eval batch")
  flags.DEFINE_integer("threads", 4, "host decode / augmentation threads")
  flags.DEFINE_string("results", None, "results store .jsonl to append top1/top5 rows to")
  flags.DEFINE_string("workdir", None, "run folder")
  flags.DEFINE_integer("train_limit", None, "smoke runs: first N training examples only")
  flags.DEFINE_integer("test_limit", None, "smoke runs: first N test examples only")
  flags.DEFINE_bool("progress", True, "show a progress bar (process 0)")
  flags.DEFINE_string("coordinator_address", None,
                      "multi-host: host:port of process 0's coordinator")
  flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
  flags.DEFINE_integer("process_id", None, "multi-host: index of this process")


def main(argv: list[str]) -> None:
  """Runs the subcommand (exit codes: module docstring)."""
  if len(argv) > 1:
    raise ValueError(f"finetune: unexpected arguments {argv[1:]}")
  opts = {name: FLAGS[name].value for name in FLAGS
          if name in _option_names()}
  from sslbench_jax.finetune import train  # pylint: disable=import-outside-toplevel
  try:
    result = run(opts)
  except train.Preempted as e:
    sys.exit(f"finetune: error: {e}")
  print(json.dumps({k: result[k] for k in ("top1", "top5", "epochs", "steps")},
                   sort_keys=True))


def _option_names() -> set[str]:
  return set(_RECIPE_FLAGS) | {
      "weights", "dataset", "data_dir", "protocol", "label_fraction", "fewshot_setup",
      "optimizer", "preprocessing", "image_size", "dtype", "checkpoint_every_steps",
      "eval_batch_size", "threads", "results", "workdir", "progress",
      "train_limit", "test_limit", "param_sharding", "model_axis_size",
      "coordinator_address", "num_processes", "process_id"}


def run(opts: dict[str, Any]) -> dict[str, Any]:
  """The subcommand as a function of its options (flag names; None = default)."""
  from sslbench_jax import parallel  # pylint: disable=import-outside-toplevel
  for name in ("weights", "dataset", "protocol", "workdir"):
    if not opts.get(name):
      raise ValueError(f"--{name} is required")
  parallel.initialize(opts.get("coordinator_address"), opts.get("num_processes"),
                      opts.get("process_id"))
  # pylint: disable=import-outside-toplevel
  from sslbench_jax.backbones import registry, weights
  from sslbench_jax.finetune import recipes, train
  _, meta = weights.load_variables(opts["weights"])
  family = registry.family(meta.get("arch") or "")
  overrides = {k: opts[k] for k in _RECIPE_FLAGS if opts.get(k) is not None}
  recipe = recipes.recipe(opts["protocol"], family, optimizer=opts.get("optimizer") or "sgd",
                          label_fraction=opts.get("label_fraction"),
                          fewshot_setup=opts.get("fewshot_setup"), **overrides)
  cfg = train.RunConfig(
      weights=opts["weights"], dataset=opts["dataset"], recipe=recipe,
      workdir=opts["workdir"], data_dir=opts.get("data_dir"),
      preprocessing=opts.get("preprocessing"), image_size=opts.get("image_size"),
      dtype=opts.get("dtype") or "float32",
      param_sharding=opts.get("param_sharding") or "replicated",
      model_axis_size=opts.get("model_axis_size") or 1,
      checkpoint_every_steps=opts.get("checkpoint_every_steps") or 500,
      eval_batch_size=opts.get("eval_batch_size") or 256,
      threads=opts.get("threads") or 4, results=opts.get("results"),
      progress=opts.get("progress", True), train_limit=opts.get("train_limit"),
      test_limit=opts.get("test_limit"))
  return train.run(cfg)
