"""``sslbench-jax finetune``: the trained protocols from the command line.

  sslbench-jax finetune --weights W.npz --dataset NAME \
      --protocol linear_aug|full|fewshot [--label_fraction 0.01|0.1] \
      [--epochs N --batch_size B --image_size S --optimizer sgd|adamw \
       --checkpoint_every_steps N] --workdir DIR

The option flags are the protocol table's: every field of
``finetune.protocol``'s options dataclasses is one flag (``--epochs``,
``--lr``, ``--layer_decay``, ``--param_sharding`` ...); an unset flag keeps
the study's value for the protocol and backbone family. Writes
``DIR/metrics.jsonl``, ``DIR/result.json``, ``DIR/checkpoints/`` and
``DIR/tensorboard/`` (``sslbench_jax.finetune.train``). Re-running on a
finished DIR prints its result; on an interrupted one it resumes. SIGTERM
checkpoints and exits 1. Exit codes: 2 bad input (one line naming it,
nothing written), 1 runtime failure.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Any

from absl import flags

from sslbench_jax.finetune import protocol
from sslbench_jax.protocols import _fields
from sslbench_jax.protocols import base

FLAGS = flags.FLAGS

# Flags of the command itself (not protocol options): name, kind, default, help.
_COMMAND_FLAGS = (
    ("weights", "string", None, "converted weights .npz (with its .json sidecar)"),
    ("dataset", "string", None, "dataset name (trains on train, tests on test)"),
    ("data_dir", "string", None, "dataset root, if the dataset needs one"),
    ("preprocessing", "string", None, "eval preset; default: the architecture's"),
    ("seed", "integer", 0, "head init / data order / augmentation seed"),
    ("results", "string", None, "results store .jsonl to append top1/top5 rows to"),
    ("workdir", "string", None, "run folder"),
    ("progress", "bool", True, "show a progress bar (process 0)"),
    ("coordinator_address", "string", None,
     "multi-host: host:port of process 0's coordinator"),
    ("num_processes", "integer", None, "multi-host: number of processes"),
    ("process_id", "integer", None, "multi-host: index of this process"),
)
_DEFINE = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
           "float": flags.DEFINE_float, "bool": flags.DEFINE_bool}
_KIND = {"int": "integer", "float": "float", "bool": "bool", "str": "string"}
_SEED = _fields.FieldSpec("seed", "int", False, False, 0, "", None, None, None)


@functools.lru_cache(maxsize=None)
def option_fields() -> dict[str, _fields.FieldSpec]:
  """Every option flag (field name -> spec) over the three protocols' options."""
  out: dict[str, _fields.FieldSpec] = {}
  for cls in protocol.OPTIONS.values():
    for spec in _fields.specs(cls):
      seen = out.setdefault(spec.name, spec)
      if (seen.kind, seen.is_list) != (spec.kind, spec.is_list):
        raise RuntimeError(f"option {spec.name!r} differs between protocols")
  return out


def define_flags() -> None:
  """Defines this subcommand's absl flags."""
  for name, kind, default, help_ in _COMMAND_FLAGS:
    _DEFINE[kind](name, default, help_)
  flags.DEFINE_enum("protocol", None, list(protocol.OPTIONS), "trained protocol")
  for spec in option_fields().values():
    # Unset (None) = the protocol's recipe value for the backbone family.
    _DEFINE[_KIND[spec.kind]](spec.name, None,
                              f"{spec.help} (default: {_defaults_text(spec.name)})")


def _defaults_text(name: str) -> str:
  """Each protocol's default of option ``name``, for ``--help``."""
  texts = {}
  for proto, cls in protocol.OPTIONS.items():
    for spec in _fields.specs(cls):
      if spec.name == name:
        texts[proto] = spec.default_text or ("-" if spec.default is None else
                                             _fields.to_text(spec, spec.default))
  if len(set(texts.values())) == 1:
    return next(iter(texts.values()))
  return ", ".join(f"{k} {v}" for k, v in texts.items())


def main(argv: list[str]) -> None:
  """Runs the subcommand (exit codes: module docstring)."""
  if len(argv) > 1:
    raise ValueError(f"finetune: unexpected arguments {argv[1:]}")
  names = {n for n, *_ in _COMMAND_FLAGS} | set(option_fields()) | {"protocol"}
  opts = {name: FLAGS[name].value for name in names}
  from sslbench_jax.finetune import train  # pylint: disable=import-outside-toplevel
  try:
    result = run(opts)
  except train.Preempted as e:
    sys.exit(f"finetune: error: {e}")
  print(json.dumps({k: result[k] for k in ("top1", "top5", "epochs", "steps")},
                   sort_keys=True))


def options(name: str, values: dict[str, Any]) -> Any:
  """The typed options of ``--protocol name`` from flag values (None = unset).

  Raises:
    ValueError: a value of the wrong type or out of range (naming the flag), or
      a flag the protocol does not have.
  """
  if name not in protocol.OPTIONS:
    raise ValueError(f"--protocol must be one of {', '.join(protocol.OPTIONS)}, "
                     f"got {name!r}")
  cls = protocol.OPTIONS[name]
  specs = {s.name: s for s in _fields.specs(cls)}
  given = {k: v for k, v in values.items() if v is not None}
  foreign = sorted(k for k in given if k not in specs)
  if foreign:
    raise ValueError(f"--{foreign[0]} is not an option of --protocol {name} "
                     f"(its options: {', '.join(specs)})")
  return cls(**{k: _fields.parse(specs[k], v, f"--{k}") for k, v in given.items()})


def run(opts: dict[str, Any]) -> dict[str, Any]:
  """The subcommand as a function of its options (flag names; None = default)."""
  from sslbench_jax import parallel  # pylint: disable=import-outside-toplevel
  for name in ("weights", "dataset", "protocol", "workdir"):
    if not opts.get(name):
      raise ValueError(f"--{name} is required")
  command = {n for n, *_ in _COMMAND_FLAGS} | {"protocol"}
  unknown = sorted(set(opts) - command - set(option_fields()))
  if unknown:
    raise ValueError(f"unknown finetune option(s) {unknown}")
  parallel.initialize(opts.get("coordinator_address"), opts.get("num_processes"),
                      opts.get("process_id"))
  from sslbench_jax.finetune import train  # pylint: disable=import-outside-toplevel
  chosen = options(opts["protocol"], {k: v for k, v in opts.items() if k not in command})
  seed = opts.get("seed")
  context = base.RunContext(
      seed=0 if seed is None else _fields.parse(_SEED, seed, "--seed"),
      progress=opts.get("progress", True) is not False, workdir=opts["workdir"],
      weights_path=opts["weights"])
  split = base.ImageInputs(opts["dataset"], "train", opts.get("data_dir"),
                           opts.get("preprocessing"))
  cfg = protocol.run_config(split, dataclasses.replace(split, split="test"), chosen,
                            context)
  return train.run(dataclasses.replace(cfg, results=opts.get("results")))
