"""``evaluate``'s config, checked whole before any work (``validate``, ``check_inputs``).

Every error is one ``ValueError`` / ``FileNotFoundError`` line naming the
config key (``config.models.rn18.arch``, ``config.protocols.knn.knn_k[0]``);
``cli`` turns it into exit code 2. Protocol entries are checked by the
protocol table (``protocols/registry.options_from_mapping``: typed values,
ranges, choices), model options by the converter's option table
(``convert/arch_options.py``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import ml_collections

from sslbench_jax import plan
from sslbench_jax.config_utils import check_keys

MODEL_KEYS = frozenset({"arch", "checkpoint", "select", "allow_missing", "options",
                        "representation", "protocols", "head", "preprocessing"})
# Optional per model: ``representation`` (default config.extraction's) and
# ``protocols`` (names of the protocols to run on it; default all).
# ``head``: a released linear-head file stored with the weights (convert --head),
# scored by ``released_head`` protocols (convert/heads.py).
# ``preprocessing``: a preset replacing every dataset entry's for this model
# (SimCLR's TensorFlow releases take [0, 1] pixels: ``no_norm``).
_OPTIONAL_MODEL_KEYS = frozenset({"representation", "protocols", "head", "preprocessing"})
DATASET_KEYS = frozenset({"dataset", "train_split", "test_split", "data_dir",
                          "preprocessing", "test_dataset", "test_data_dir"})
EXTRACTION_KEYS = frozenset({"representation", "dtype", "batch_size_per_device",
                             "steps_per_shard", "models_per_pass"})
# ``models_per_pass``: at most this many (model, representation) feature sets
# extracted in one decode pass over a split (1: one pass per model).
_OPTIONAL_EXTRACTION_KEYS = frozenset({"models_per_pass"})
TOP_KEYS = frozenset({"models", "datasets", "protocols", "extraction", "analysis", "seed"})
# Entry names become file names and "/"-separated step keys.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# What each backbone family returns (backbones/*.py); "logits" only with a head.
REPRESENTATIONS = {
    "resnet": ("pre_logits", "layer3_avg", "logits"),
    "vit": ("pre_logits", "cls", "patch_mean", "last4_cls", "logits"),
    "efficientnet": ("pre_logits", "logits") + tuple(f"stage{n}_avg" for n in range(1, 8)),
}


def _section(config: Mapping[str, Any], key: str, where: str) -> Any:
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


def _names(section: Mapping[str, Any], where: str) -> None:
  for name in section:
    if not _NAME_RE.match(str(name)):
      raise ValueError(f"{where} entry name {name!r} must be letters, digits, _ . + - "
                       "(it names files and step keys)")


def _consumes(protocol_type: Any) -> str | None:
  """What a protocol type reads, None for an unknown type (reported later)."""
  from sslbench_jax.protocols import registry  # pylint: disable=g-import-not-at-top
  try:
    return registry.get(protocol_type).consumes
  except ValueError:
    return None


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the whole config before any work; the error names the key.

  Unknown keys and inconsistent references, then every value: architectures,
  model options (the converter's option table), dataset names, splits and
  preprocessing presets, representations (per backbone family), dtype, batch
  sizes and other counts (positive integers), and each protocol entry by the
  protocol table (its type, then its options: typed values, choices, ranges).

  Raises:
    ValueError: the first problem found.
  """
  from sslbench_jax.backbones import registry  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import registry as data_registry  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import extract  # pylint: disable=g-import-not-at-top
  check_keys(config, TOP_KEYS, "config")
  for key in sorted(TOP_KEYS):
    _section(config, key, "config")
  models = _mapping(config.models, "config.models")
  datasets = _mapping(config.datasets, "config.datasets")
  protocols = _mapping(config.protocols, "config.protocols")
  _int_at_least(config.seed, 0, "config.seed")
  ex = _mapping(config.extraction, "config.extraction")
  check_keys(ex, EXTRACTION_KEYS, "config.extraction")
  for key in sorted(EXTRACTION_KEYS - _OPTIONAL_EXTRACTION_KEYS):
    _section(ex, key, "config.extraction")
  _int_at_least(ex.get("models_per_pass", plan.MODELS_PER_PASS), 1,
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
  # Representations matter only when some protocol reads features (an
  # unknown type counts: it is reported below, with the valid types).
  features_used = any(_consumes(p.get("type")) in (None, "features")
                      for p in protocols.values())
  for name, m in models.items():
    where = f"config.models.{name}"
    check_keys(m, MODEL_KEYS, where)
    for key in sorted(MODEL_KEYS - _OPTIONAL_MODEL_KEYS):
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
    reps = REPRESENTATIONS.get(registry.family(m.arch))
    rep_used = plan.model_representation(config, m)
    if features_used and reps is not None and rep_used not in reps:
      rep_key = (f"{where}.representation" if m.get("representation")
                 else "config.extraction.representation")
      raise ValueError(f"{rep_key}={rep_used!r} is not "
                       f"an output of {m.arch} (model {name}); known: {', '.join(reps)}")
  for name, d in datasets.items():
    where = f"config.datasets.{name}"
    check_keys(d, DATASET_KEYS, where)
    for key in ("dataset", "train_split", "test_split", "data_dir", "preprocessing"):
      _section(d, key, where)
    for key in ("data_dir", "test_data_dir", "test_dataset"):
      _optional_str(d.get(key), f"{where}.{key}")
    train, test = plan.splits(d)
    for key, sp in (("dataset", train), ("test_dataset", test)):
      if sp.dataset not in data_registry.names():
        raise ValueError(f"{where}.{key} {sp.dataset!r} unknown; known: "
                         f"{', '.join(data_registry.names())}")
    for key, sp in (("train_split", train), ("test_split", test)):
      known = data_registry.get_spec(sp.dataset).splits
      if sp.split not in known:
        raise ValueError(f"{where}.{key} {sp.split!r} is not a split of "
                         f"{sp.dataset}; known: {', '.join(sorted(known))}")
    if d.preprocessing is not None and d.preprocessing not in preprocess.PRESETS:
      raise ValueError(f"{where}.preprocessing {d.preprocessing!r} unknown; known: "
                       f"{', '.join(preprocess.PRESETS)} (or None: the dataset's default)")
  for name, p in protocols.items():
    check_protocol(name, _mapping(p, f"config.protocols.{name}"), datasets)


def _check_model_options(options: Any, arch: str, where: str) -> None:
  """Model options by the converter's table (``--arch_options`` types and choices)."""
  from sslbench_jax.convert import arch_options  # pylint: disable=g-import-not-at-top
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
    arch_options.parse_arch_options(",".join(items), arch)
  except ValueError as e:
    raise ValueError(f"{where}: {str(e).replace('--arch_options ', '')}") from None


def check_protocol(name: str, p: Mapping[str, Any], datasets: Mapping[str, Any]) -> Any:
  """One protocol entry: its type (the protocol table), datasets, typed options.

  Returns:
    The entry's options object (``registry.options_from_mapping``).
  """
  from sslbench_jax.protocols import registry  # pylint: disable=g-import-not-at-top
  where = f"config.protocols.{name}"
  if p.get("type") not in registry.names():
    raise ValueError(f"{where}.type={p.get('type')!r} must be one of "
                     f"{tuple(registry.names())}")
  uses = {f.name for f in registry.fields(p["type"])}
  extra = set(p.keys()) - {"type", "datasets"} - uses
  if extra:
    # An option of another protocol type is almost always a mistake of type.
    others = {f.name for n in registry.names() for f in registry.fields(n)}
    unused = sorted(extra & others)
    if unused:
      raise ValueError(f"{where}: option(s) {unused} are not used by type {p['type']}; "
                       f"its options: {sorted(uses) or 'none'}")
    check_keys(p, {"type", "datasets"} | uses, where)
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
  return plan.protocol_options(p, where)


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Checks that the config's files exist (checkpoints, data folders).

  Separate from ``validate`` (which needs no file, so a study config can be
  checked anywhere); ``evaluate.run`` calls both before writing anything.

  Raises:
    FileNotFoundError: a checkpoint, or the ``data_dir`` / ``test_data_dir``
      of a dataset read from folders only (no TFDS backend), is missing (the
      message names the config key and the path). A TFDS data dir may not
      exist yet (TFDS creates it; tests mock it).
    ValueError: an unknown ``package:`` checkpoint.
  """
  from sslbench_jax.convert import cache as convert_cache  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import registry as data_registry  # pylint: disable=g-import-not-at-top
  for name, m in config.models.items():
    try:
      convert_cache.resolve_checkpoint(m.checkpoint)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"config.models.{name}.checkpoint: {e}") from None
    except ValueError as e:
      raise ValueError(f"config.models.{name}.checkpoint: {e}") from None
    if m.get("head") and not os.path.isfile(m.head):
      raise FileNotFoundError(f"config.models.{name}.head: head file {m.head} does not exist")
  for name, d in config.datasets.items():
    for key, sp in zip(("data_dir", "test_data_dir"), plan.splits(d)):
      folders_only = data_registry.get_spec(sp.dataset).tfds is None
      if folders_only and sp.data_dir and not os.path.exists(sp.data_dir):
        raise FileNotFoundError(f"config.datasets.{name}.{key}: {sp.data_dir} does not exist")


def _model_extras(config: ml_collections.ConfigDict, m: ml_collections.ConfigDict,
                  where: str) -> None:
  """Checks a model's optional keys and a ``random:SEED`` checkpoint."""
  from sslbench_jax.backbones import random_init  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  random_init.parse_seed(m.checkpoint)  # a bad seed: ValueError naming the spec
  _optional_str(m.get("representation"), f"{where}.representation")
  _optional_str(m.get("head"), f"{where}.head")
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
