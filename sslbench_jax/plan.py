"""What an ``evaluate`` run must do, decided from its config and state alone (no I/O).

* Splits: a dataset entry trains on ``dataset``'s ``train_split`` and tests
  on ``test_dataset``'s ``test_split`` (``splits``); a model's own
  ``preprocessing`` replaces the entry's (``model_splits``). A ``Split`` is
  everything a feature set depends on besides the model.
* Feature files: one per (model, split, representation), named
  ``<model>__<stem>__<representation>.npz`` (``feature_stems``).
* Steps: one per (model, protocol, dataset entry), keyed by everything its
  result depends on (``step_inputs``); ``make_plan`` lists them with why each
  runs (or None: done for the same inputs, per ``done.json``) and the feature
  sets the steps to run read.
* Extraction passes: the wanted feature sets grouped by what the decoded
  images depend on (dataset, data_dir, split, effective preprocessing), at
  most ``models_per_pass`` models per pass (``extraction_passes``); ReaL sets
  cut out of the run's ImageNet val sets instead (``derivable_parent``).

Protocols are looked up in the protocol table (``protocols/registry.py``) by
the config entry's ``type``: what a protocol ``consumes`` decides the
features it reads (``features``: train and test at the model's
representation; ``logits``: the test split's logits; ``head``: the test split
at the released head's representation; ``images``: none, it reads images).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping

MODELS_PER_PASS = 8  # default of config.extraction.models_per_pass


@dataclasses.dataclass(frozen=True)
class Split:
  """One dataset split as features see it: everything they depend on but the model."""
  dataset: str
  data_dir: str | None
  split: str
  preprocessing: str | None


# (model name, split, representation): one feature set.
FeatureKey = tuple[str, Split, str]


@dataclasses.dataclass(frozen=True)
class Step:
  """One (model, protocol, dataset entry) step of the run.

  Attributes:
    model, protocol, dataset: the config entry names.
    key: ``model/protocol/dataset`` (its key in ``done.json`` and the rows).
    inputs: everything its result depends on (``step_inputs``).
    fingerprint: sha256 of ``inputs``.
    why: why it runs, or None when it is done for these inputs.
    features: the feature sets it reads (``FeatureKey``s; none for images).
  """
  model: str
  protocol: str
  dataset: str
  key: str
  inputs: dict[str, Any]
  fingerprint: str
  why: str | None
  features: tuple[FeatureKey, ...]


def splits(d: Mapping[str, Any]) -> tuple[Split, Split]:
  """A dataset entry's (train, test) splits; the test side may be another dataset."""
  test_dataset = d.get("test_dataset") or d["dataset"]
  test_data_dir = d.get("test_data_dir") or d["data_dir"]
  return (Split(d["dataset"], d["data_dir"], d["train_split"], d["preprocessing"]),
          Split(test_dataset, test_data_dir, d["test_split"], d["preprocessing"]))


def model_splits(m: Mapping[str, Any], d: Mapping[str, Any]) -> tuple[Split, Split]:
  """``splits(d)`` with the model's own ``preprocessing``, if it has one."""
  train, test = splits(d)
  if m.get("preprocessing"):
    train, test = (dataclasses.replace(sp, preprocessing=m["preprocessing"])
                   for sp in (train, test))
  return train, test


def model_representation(config: Mapping[str, Any], m: Mapping[str, Any]) -> str:
  """The model's ``representation``, else ``config.extraction.representation``."""
  return m.get("representation") or config["extraction"]["representation"]


def head_representation(weights_meta: Mapping[str, Any]) -> str:
  """The representation the stored released head applies to (sidecar)."""
  from sslbench_jax.probes import heads  # pylint: disable=g-import-not-at-top
  return heads.head_representation(dict(weights_meta))


def feature_stems(datasets: Mapping[str, Any]) -> dict[Split, str]:
  """A feature-file stem per distinct split of the config's dataset entries.

  Named after the first entry (in ``ConfigDict`` order: by name) using it --
  ``<entry>__<split>``, or ``<entry>__<test dataset>__<split>`` for a test set
  of another dataset -- so entries that share a split (ImageNet-1k train for
  every variant) share one file, and the name does not depend on which steps
  an earlier run finished. A clash between different splits gets a hash suffix.
  """
  stems: dict[Split, str] = {}
  for name, d in datasets.items():
    train, test = splits(d)
    for s, stem in ((train, f"{name}__{train.split}"),
                    (test, f"{name}__{test.split}" if test.dataset == d["dataset"]
                     else f"{name}__{test.dataset}__{test.split}")):
      if s in stems:
        continue
      if stem in stems.values():
        digest = hashlib.sha256(repr(dataclasses.astuple(s)).encode()).hexdigest()
        stem = f"{stem}__{digest[:8]}"
      stems[s] = stem
  return stems


def run_stems(config: Mapping[str, Any]) -> dict[Split, str]:
  """``feature_stems`` plus the splits of models with their own preprocessing
  (``<stem>__<preset>``: their own files)."""
  stems = feature_stems(config["datasets"])
  for m in config["models"].values():
    for d in config["datasets"].values():
      for s, own in zip(splits(d), model_splits(m, d)):
        stems.setdefault(own, f"{stems[s]}__{own.preprocessing}")
  return stems


def feature_tag(key: FeatureKey, stems: Mapping[Split, str]) -> str:
  """The file name (without ``.npz``) of a feature set: ``<model>__<stem>__<rep>``."""
  model_name, s, representation = key
  return f"{model_name}__{stems[s]}__{representation}"


def step_features(config: Mapping[str, Any], model_name: str,
                  weights_meta: Mapping[str, Any], p: Mapping[str, Any],
                  d: Mapping[str, Any]) -> tuple[FeatureKey, ...]:
  """The feature sets one step reads (by what its protocol consumes)."""
  m = config["models"][model_name]
  train, test = model_splits(m, d)
  consumes = _consumes(p["type"])
  if consumes == "logits":
    return ((model_name, test, "logits"),)
  if consumes == "head":
    return ((model_name, test, head_representation(weights_meta)),)
  if consumes == "images":
    return ()
  rep = model_representation(config, m)
  return ((model_name, train, rep), (model_name, test, rep))


def needed_features(config: Mapping[str, Any]) -> set[tuple[Split, str]]:
  """Every (split, representation) some step of ``config`` reads (done or not).

  Decides whether a ReaL set can be cut out of val features the run has
  anyway; a released head counts at ``pre_logits`` (the default head
  representation: its sidecar is not read here).
  """
  out = set()
  for p in config["protocols"].values():
    consumes = _consumes(p["type"])
    for ds_name in p["datasets"]:
      for m in config["models"].values():
        train, test = model_splits(m, config["datasets"][ds_name])
        if consumes == "logits":
          out.add((test, "logits"))
        elif consumes == "head":
          out.add((test, "pre_logits"))
        elif consumes == "features":
          rep = model_representation(config, m)
          out.update({(train, rep), (test, rep)})
  return out


def _split_inputs(sp: Split) -> dict[str, Any]:
  return dict(dataset=sp.dataset, split=sp.split, preprocessing=sp.preprocessing,
              data_dir=os.path.abspath(sp.data_dir) if sp.data_dir else None)


def step_inputs(config: Mapping[str, Any], m: Mapping[str, Any],
                weights_meta: Mapping[str, Any], p: Mapping[str, Any],
                d: Mapping[str, Any]) -> dict[str, Any]:
  """Everything a step's result depends on (its key in ``done.json``).

  The released checkpoint's sha256 and the converted model's options (from
  the weights' sidecar), the config's select / allow_missing / options, the
  train and test splits (dataset, split, preprocessing, data_dir), the
  representation and dtype, the protocol type with every option it reads
  (defaults filled in, result-neutral ones such as ``progress`` left out),
  and the seed. Batch sizes are left out: extraction is exact for any batch
  size.
  """
  train, test = model_splits(m, d)
  consumes = _consumes(p["type"])
  inputs = dict(
      model=dict(arch=m["arch"], checkpoint_sha256=(weights_meta.get("checkpoint_sha256")
                                                    or weights_meta.get("weights_sha256", "")),
                 arch_options=weights_meta.get("arch_options", {}), select=m["select"],
                 allow_missing=m["allow_missing"], options=dict(m["options"] or {})),
      test=_split_inputs(test),
      protocol=dict(type=p["type"], options=protocol_option_values(p)),
      seed=config["seed"])
  if consumes != "images":  # images are decoded by the protocol itself
    inputs["representation"] = (head_representation(weights_meta) if consumes == "head"
                                else "logits" if consumes == "logits"
                                else model_representation(config, m))
    inputs["dtype"] = config["extraction"]["dtype"]
  if consumes in ("features", "images"):
    inputs["train"] = _split_inputs(train)
  if consumes == "head":
    inputs["released_head"] = (weights_meta.get("released_head") or {}).get("source_sha256")
  # JSON round trip: the same types as the record read back from done.json.
  return json.loads(json.dumps(inputs, sort_keys=True))


def fingerprint(inputs: Mapping[str, Any]) -> str:
  """The sha256 of a step's inputs."""
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def make_plan(config: Mapping[str, Any], metas: Mapping[str, Mapping[str, Any]],
              why_run: Callable[[str, str, dict[str, Any]], str | None]
              ) -> tuple[list[Step], list[FeatureKey]]:
  """Every (model, protocol, dataset entry) step, and the features of those to run.

  Args:
    config: a validated config.
    metas: model name -> its converted weights' sidecar.
    why_run: ``(step key, fingerprint, inputs) -> reason or None`` (the
      progress record, ``workdir.Progress.why_run``).

  Returns:
    ``(steps, wanted)``: steps in config order (models, then protocols, then
    the protocol's dataset entries), and the distinct feature sets the steps
    that run read, in first-use order.
  """
  steps, wanted = [], {}
  for model_name, m in config["models"].items():
    for proto_name, p in config["protocols"].items():
      if m.get("protocols") is not None and proto_name not in m["protocols"]:
        continue
      for ds_name in p["datasets"]:
        key = "/".join((model_name, proto_name, ds_name))
        d = config["datasets"][ds_name]
        inputs = step_inputs(config, m, metas[model_name], p, d)
        fp = fingerprint(inputs)
        why = why_run(key, fp, inputs)
        feats = step_features(config, model_name, metas[model_name], p, d)
        steps.append(Step(model_name, proto_name, ds_name, key, inputs, fp, why, feats))
        if why is not None:
          wanted.update(dict.fromkeys(feats))
  return steps, list(wanted)


def derivable_parent(s: Split, run_splits: Mapping[Split, Any] | Any) -> Split | None:
  """The split of this run that split ``s`` can be cut out of (ReaL from val).

  That is the split ``s``'s dataset is derived from (the data registry's
  ``derived_from``) among ``run_splits``, with the same ``data_dir`` and
  preprocessing (representation and model are the caller's); None for a
  split of a dataset that is not derived, or when the run has no such split.
  """
  from sslbench_jax.data import derived  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import registry as data_registry  # pylint: disable=g-import-not-at-top
  if data_registry.get_spec(s.dataset).derived_from is None:
    return None
  for v in run_splits:
    if (v.data_dir == s.data_dir and v.preprocessing == s.preprocessing
        and derived.is_parent_split(s.dataset, s.split, v.dataset, v.split)):
      return v
  return None


@dataclasses.dataclass(frozen=True)
class ExtractionPlan:
  """How the wanted feature sets are made.

  Attributes:
    passes: decode passes, each ``((dataset, data_dir, split, preset),
      [FeatureKey, ...])`` -- one source decoded once for up to
      ``models_per_pass`` models.
    derived: ``(key, parent key)``: sets cut out of a parent set (ReaL out of
      val) after the passes; those that cannot be cut are extracted by
      ``leftover_passes``.
  """
  passes: list[tuple[tuple[Any, ...], list[FeatureKey]]]
  derived: list[tuple[FeatureKey, FeatureKey]]


def extraction_passes(items: list[FeatureKey], arch_of: Callable[[str], str],
                      models_per_pass: int) -> list[tuple[tuple[Any, ...], list[FeatureKey]]]:
  """``items`` grouped into as few decode passes as ``models_per_pass`` allows.

  Items are grouped by what the decoded images depend on: dataset, data_dir,
  split and the effective preprocessing preset (the split's, else the model
  architecture's default, as ``sslbench-jax features`` resolves it); each
  group is cut into passes of at most ``models_per_pass`` items, in order.
  Passes are ordered by chunk, then group (the first ``models_per_pass``
  models of every split, then the next ones...), so the models whose weights
  are loaded at one time stay about ``models_per_pass``.
  """
  from sslbench_jax.backbones import registry  # pylint: disable=g-import-not-at-top
  groups: dict[tuple[Any, ...], list[FeatureKey]] = {}
  for model_name, s, r in items:
    preset = s.preprocessing or registry.default_preprocessing(arch_of(model_name))
    groups.setdefault((s.dataset, s.data_dir, s.split, preset), []).append(
        (model_name, s, r))
  chunks = [(i, n, k, g[i:i + models_per_pass]) for n, (k, g) in enumerate(groups.items())
            for i in range(0, len(g), models_per_pass)]
  return [(k, chunk) for _, _, k, chunk in sorted(chunks, key=lambda c: c[:2])]


def extraction_plan(config: Mapping[str, Any], wanted: list[FeatureKey],
                    arch_of: Callable[[str], str]) -> ExtractionPlan:
  """The passes and derivations that make the ``wanted`` feature sets.

  A ReaL set is cut out of the same model's val set at the same
  representation when the run reads that val set anyway (``needed_features``);
  the val set is then extracted in its pass. Everything else is extracted.
  """
  stems = run_stems(config)
  needed = needed_features(config)
  direct: dict[FeatureKey, None] = {}
  derived = []
  for model_name, s, r in wanted:
    parent = derivable_parent(s, stems)
    if parent is not None and (parent, r) in needed:
      derived.append(((model_name, s, r), (model_name, parent, r)))
      direct[model_name, parent, r] = None
    else:
      direct[model_name, s, r] = None
  per_pass = config["extraction"].get("models_per_pass", MODELS_PER_PASS)
  return ExtractionPlan(extraction_passes(list(direct), arch_of, per_pass), derived)


# -- the protocol table, as the plan reads it ---------------------------------


def _consumes(protocol_type: str) -> str:
  """What protocol type ``protocol_type`` reads (the protocol table's ``consumes``)."""
  from sslbench_jax.protocols import registry  # pylint: disable=g-import-not-at-top
  return registry.get(protocol_type).consumes


def protocol_options(p: Mapping[str, Any], where: str = "protocol") -> Any:
  """The typed options of a config's protocol entry (everything but ``type``, ``datasets``)."""
  from sslbench_jax.protocols import registry  # pylint: disable=g-import-not-at-top
  return registry.options_from_mapping(
      p["type"], {k: v for k, v in p.items() if k not in ("type", "datasets")}, where)


# Options that do not change a step's result (not part of its key).
RESULT_NEUTRAL_OPTIONS = frozenset({"progress"})


def protocol_option_values(p: Mapping[str, Any]) -> dict[str, Any]:
  """A protocol entry's option values with the defaults filled in, JSON-ready,
  without the result-neutral ones (part of the step's inputs)."""
  from sslbench_jax.protocols import registry  # pylint: disable=g-import-not-at-top
  values = registry.options_to_hparams(protocol_options(p))
  return {k: values[k] for k in sorted(values) if k not in RESULT_NEUTRAL_OPTIONS}
