"""``sslbench-jax probe``: kNN / linear / logreg / least-squares / few-shot on
cached feature files.

Example::

  sslbench-jax probe --features-train train.npz --features-test val.npz \\
      --protocol knn --knn-metric cosine --results results.jsonl

Reads two ``features.io`` files, runs one protocol of the protocol table
(``protocols/registry.py``) and prints a table and, with ``--results``,
appends one row per metric to the results store (accuracies in percent).

The flags are generated from the table: every option field of every protocol
that consumes cached features is a flag of the same name (dashed aliases:
``--knn-k`` = ``--knn_k``), with the field's default and help; list flags are
comma-separated and parsed to typed values once. A flag the chosen protocol
does not read is logged as ignored.

The test file is scored in its own label space (``metrics/scoring.py``, read
from the file's provenance): top-1 / top-5 plus the space's standard
metrics, e.g. ``real_top1`` for ImageNet-ReaL (multi-hot test labels),
``subset_top1`` for ImageNet-R / -A (1000-way scores restricted to the 200
classes). The probe trains on the training file's single-label classes; both
files must share the number of classes (ImageNet-1k train -> R / A / ReaL).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Mapping, Sequence

from absl import flags
from absl import logging

from sslbench_jax.protocols import _fields
from sslbench_jax.protocols import base
from sslbench_jax.protocols import registry

FLAGS = flags.FLAGS

# The flags every protocol reads (the run's inputs and ``RunContext``), as
# (name, kind, default, help).
_COMMON_FLAGS = (
    ("features_train", "string", None,
     "training feature file (.npz from `features`); linear: several comma-"
     "separated files = several feature sources (e.g. cls,avgpool)"),
    ("features_test", "string", None,
     "test feature file(s), in the order of --features-train"),
    ("protocol", "string", "knn", "one of the protocols on cached features"),
    ("model", "string", None, "model name for the results; default: the files' arch"),
    ("dataset", "string", None, "dataset name for the results; default: from the files"),
    ("num_classes", "integer", None,
     "classes; default: meta num_classes or max label + 1"),
    ("seed", "integer", 0, "seed of splits, subsets and initialisation"),
    ("progress", "bool", True,
     "progress bars with throughput on stderr (process 0; knn, linear, logreg, "
     "fewshot); results do not depend on it"),
)
_DEFINE = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
           "float": flags.DEFINE_float, "bool": flags.DEFINE_bool,
           "list": flags.DEFINE_list}
_KIND = {"int": "integer", "float": "float", "bool": "bool", "str": "string"}


def protocols() -> tuple[str, ...]:
  """The protocols this command runs: those of the table on cached features."""
  return registry.names(consumes="features")


@functools.lru_cache(maxsize=None)
def option_fields() -> dict[str, _fields.FieldSpec]:
  """Every option flag (field name -> spec) over ``protocols()``, table order.

  A field several protocols share (``holdout``, ``knn_metric``) is one flag,
  so they must agree on its type and default.
  """
  out: dict[str, _fields.FieldSpec] = {}
  for name in protocols():
    for spec in registry.fields(name):
      seen = out.setdefault(spec.name, spec)
      if (seen.kind, seen.is_list, seen.optional, seen.default) != (
          spec.kind, spec.is_list, spec.optional, spec.default):
        raise RuntimeError(f"option {spec.name!r} differs between protocols "
                           f"({seen} vs {spec}); one flag cannot serve both")
  return out


def _flag_default(spec: _fields.FieldSpec) -> Any:
  """The absl default of an option flag (None: shown in the help instead)."""
  if spec.default is None or spec.default_text is not None:
    return None
  if spec.is_list:
    return _fields.to_text(spec, spec.default).split(",")
  return spec.default


def _flag_help(spec: _fields.FieldSpec) -> str:
  if spec.default_text is not None:
    return f"{spec.help}; default {spec.default_text}"
  return spec.help


def define_flags() -> None:
  """Defines this subcommand's absl flags (idempotent), with dashed aliases."""
  if "features_train" in FLAGS:
    return
  specs = list(_COMMON_FLAGS)
  specs[2] = ("protocol", "string", "knn", f"one of {', '.join(protocols())}")
  specs += [(s.name, "list" if s.is_list else _KIND[s.kind], _flag_default(s),
             _flag_help(s)) for s in option_fields().values()]
  specs.append(("results", "string", None,
                "results store (.jsonl) to append to; default: print only"))
  for name, kind, default, help_ in specs:
    _DEFINE[kind](name, default, help_)
    if "_" in name:
      flags.DEFINE_alias(name.replace("_", "-"), name)


def main(argv: Sequence[str]) -> None:
  """Runs the probe described by the flags; prints and stores the results."""
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.results:
    # Fail before minutes of probing, not after. OSError propagates (the CLI
    # turns it into one line, exit 1): an unwritable store is not bad input.
    check_writable(FLAGS.results)
  try:
    rows = run(_given_flags())
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  _print(rows)
  if FLAGS.results:
    from sslbench_jax.results import store  # pylint: disable=g-import-not-at-top
    store.append_results(FLAGS.results, rows)
    print(f"appended {len(rows)} rows to {FLAGS.results}")


def check_writable(path: str) -> None:
  """Raises OSError (naming ``path``) when ``path`` cannot be appended to.

  Leaves nothing behind: an existing file is opened for appending without
  writing; for a new file, a temporary file is created and removed in the
  nearest existing parent directory (the store creates the missing ones).
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  try:
    if os.path.exists(path):
      os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
      return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    fd, tmp = tempfile.mkstemp(prefix=".probe-write-check-", dir=parent)
    os.close(fd)
    os.remove(tmp)
  except OSError as e:
    raise type(e)(e.errno, e.strerror, path) from None


def _given_flags() -> dict[str, Any]:
  """The flags given on the command line (the others take the defaults)."""
  names = [n for n, *_ in _COMMON_FLAGS] + list(option_fields())
  return {n: FLAGS[n].value for n in names if FLAGS[n].present}


def run(values: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Runs one protocol from flag values (the command line as a mapping).

  Args:
    values: flag name (underscored) -> value: a command-line string (lists
      comma-separated or as a list of strings) or a typed value. Missing
      flags and None take the defaults; unknown names are rejected.

  Returns:
    Results-store rows (accuracies in percent).

  Raises:
    ValueError / FileNotFoundError: one line naming the flag or the file.
  """
  common = {n: d for n, _, d, _ in _COMMON_FLAGS}
  fields = option_fields()
  unknown = sorted(set(values) - set(common) - set(fields))
  if unknown:
    raise ValueError(f"unknown probe options {unknown}; valid: "
                     f"{sorted(set(common) | set(fields))}")
  given = {k: v for k, v in values.items() if v is not None}
  opts = {**common, **given}
  name = opts["protocol"]
  if name not in protocols():
    raise ValueError(f"--protocol must be one of {protocols()}, got {name!r}")
  options = options_from_values(name, {k: v for k, v in given.items()
                                        if k in fields})
  train = base.load_features(opts["features_train"], "--features-train")
  test = base.load_features(opts["features_test"], "--features-test")
  context = base.RunContext(
      model=opts["model"] or None, dataset=opts["dataset"] or None,
      seed=_fields.parse(_SEED, opts["seed"], "--seed"),
      num_classes=(_fields.parse(_NUM_CLASSES, opts["num_classes"], "--num-classes")
                   if opts["num_classes"] else None),
      progress=bool(_fields.parse(_PROGRESS, opts["progress"], "--progress")))
  rows = registry.get(name).run(train, test, options, mesh=None, context=context).rows
  logging.info("probe %s: %d rows", name, len(rows))
  return rows


def options_from_values(protocol: str, values: Mapping[str, Any]) -> Any:
  """Protocol ``protocol``'s options from option-flag values (strings or typed).

  Flags the protocol does not read are logged as ignored when they differ from
  their default; the others are parsed (errors name ``--flag``).
  """
  fields = option_fields()
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"unknown probe options {unknown}; valid: {sorted(fields)}")
  uses = {s.name for s in registry.fields(protocol)}
  ignored = sorted(k for k, v in values.items() if k not in uses
                   and _differs_from_default(fields[k], v))
  if ignored:
    logging.warning("--protocol %s does not use %s; ignored", protocol,
                    ", ".join(f"--{k}={values[k]!r}" for k in ignored))
  return registry.get(protocol).options(**{
      k: _fields.parse(fields[k], v, "--" + k.replace("_", "-"))
      for k, v in values.items() if k in uses and v is not None})


def option_flags(options: Any) -> list[str]:
  """The command-line flags that give ``options`` (its non-default fields)."""
  return [f"--{s.name}={_fields.to_text(s, getattr(options, s.name))}"
          for s in registry.fields(options)
          if getattr(options, s.name) != s.default]


def flag_table() -> str:
  """The option flags as a Markdown table (docs/probes.md holds this text)."""
  lines = ["| flag | default | protocols | meaning |", "|---|---|---|---|"]
  for spec in option_fields().values():
    users = [n for n in protocols() if any(f.name == spec.name
                                           for f in registry.fields(n))]
    default = (spec.default_text if spec.default_text is not None else
               "derived" if spec.default is None else _fields.to_text(spec, spec.default))
    meaning = spec.help.split(": ", 1)[-1] if ": " in spec.help[:16] else spec.help
    lines.append(f"| `--{spec.name.replace('_', '-')}` | {default} | "
                 f"{', '.join(users)} | {meaning} |")
  return "\n".join(lines) + "\n"


def _spec(name: str, kind: str, default: Any, check=None) -> _fields.FieldSpec:
  return _fields.FieldSpec(name, kind, False, False, default, "", None, check, None)


_SEED = _spec("seed", "int", 0)
_NUM_CLASSES = _spec("num_classes", "int", None, base.POSITIVE)
_PROGRESS = _spec("progress", "bool", True)


def _differs_from_default(spec: _fields.FieldSpec, value: Any) -> bool:
  try:
    return _fields.parse(spec, value, spec.name) != spec.default
  except ValueError:
    return True


def _print(rows) -> None:
  for r in rows:
    print(f"{r['protocol']:<20} {r['metric']:<10} {r['value']:7.2f}  "
          f"n={r['n_examples']:<7} {json.dumps(r['hparams'], sort_keys=True)}")
