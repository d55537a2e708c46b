"""``sslbench-jax evaluate --config FILE --workdir DIR``: a whole evaluation.

The main job, as a short sequence of library calls (docs/architecture.md):

  config  --_config_check-->  valid config (nothing written before)
          --plan----------->  steps (model x protocol x dataset entry), what is done
          --convert.cache-->  DIR/weights/<model>.npz, loaded once per model
          --features------->  DIR/features/<model>__<stem>__<rep>.npz (+ DIR/cache),
                              decode passes shared by models (features.passes)
          --protocols------>  rows (protocols.registry: one table, in-memory inputs)
          --results.store-->  DIR/results.jsonl, done.json (workdir.Progress)
          --analysis------->  DIR/results.csv, DIR/report/

The config (a locked ``ml_collections`` file exposing ``get_config(arg)``; see
``configs/demo.py``) has the sections::

  models:    name -> {arch, checkpoint, select, allow_missing, options,
                      [representation], [protocols], [head], [preprocessing]}
  datasets:  name -> {dataset, train_split, test_split, data_dir, preprocessing,
                      test_dataset, test_data_dir}
  protocols: name -> {type: a protocol of protocols/registry.py, datasets: [...],
                      plus that protocol's options (typed values)}
  extraction: {representation, dtype, batch_size_per_device, steps_per_shard,
               [models_per_pass]}
  analysis:  {n_boot, n_perm}
  seed

A dataset entry trains on ``dataset``'s ``train_split`` and tests on
``test_dataset``'s ``test_split`` (``plan.splits``). Features of one (model,
split, representation) are extracted once per run and shared by every entry
and protocol needing them; a derived dataset's split (ImageNet-ReaL, cut out
of ImageNet val: ``data/derived.py``) is cut out of the parent's features when
the run reads those anyway. Feature sets go to the protocols in memory; the
files under ``DIR/features`` are their persistent copy.

Every step is resumable and keyed by its inputs (``plan.step_inputs``):
converted weights are reused while ``DIR/converted.json`` matches, features
come from the cache, and a step recorded in ``DIR/done.json`` with the same
inputs is skipped; a step whose inputs changed is unmarked, its earlier rows
removed, and run again. One run per workdir (``DIR/.lock``); each run keeps its
config as ``DIR/configs/<run id>.json``. Details: docs/evaluate.md.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterator

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from sslbench_jax import _config_check
from sslbench_jax import plan
from sslbench_jax import workdir as workdir_lib

FLAGS = flags.FLAGS

WorkdirBusyError = workdir_lib.WorkdirBusyError
validate = _config_check.validate
check_inputs = _config_check.check_inputs
MODELS_PER_PASS = plan.MODELS_PER_PASS
# Feature arrays kept in memory for the protocols beyond which a set is read
# back from its file when a step needs it (the ImageNet train features of a
# study are ~10 GB per model).
_IN_MEMORY_BYTES = 4 << 30


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
  if summary.get("csv"):  # the writer: the comparison at a glance, then where to read more
    from sslbench_jax import summary_table  # pylint: disable=g-import-not-at-top
    print(summary_table.format_table(summary["csv"]))
    print(f"report: {os.path.abspath(summary['report'])}")


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
  The writer process (``parallel.is_writer``) converts weights and writes
  files; features are extracted and protocols run by all.
  """
  from sslbench_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize()  # before anything touches a JAX backend
  from sslbench_jax.results import store  # pylint: disable=g-import-not-at-top
  validate(config)
  check_inputs(config)
  writer = parallel.is_writer()
  store_path = os.path.join(workdir, "results.jsonl")
  with workdir_lib.WorkdirLock(workdir):
    config_json = config.to_json(indent=2, sort_keys=True)
    run_id = workdir_lib.new_run_id(config_json)
    if writer:
      logging.info("run %s: config kept as %s", run_id,
                   workdir_lib.snapshot_config(workdir, run_id, config_json))
    progress = workdir_lib.Progress(workdir, run_id)
    if writer:
      progress.reconcile(store_path)
    # Every process decided from the same done.json before anything changes it.
    parallel.sync("evaluate start")
    n = 0
    for step, inputs, rows in iterate(config, workdir, progress):
      for row in rows:
        logging.info("%s %s %s %s = %.2f", row["model"], row["dataset"], row["protocol"],
                     row["metric"], row["value"])
        row.update(step=step, run_id=run_id)
      if writer:
        store.append_results(store_path, rows)
        progress.mark(step, workdir_lib.fingerprint(inputs), inputs, len(rows))
      n += len(rows)
    out = dict(new_rows=n, results=store_path, run_id=run_id)
    if writer:
      out.update(_analyse(config, workdir, store_path))
    parallel.sync("evaluate done")  # no process leaves while the writer still writes
  return out


def _analyse(config: ml_collections.ConfigDict, workdir: str, store_path: str
             ) -> dict[str, str]:
  """The CSV export, the analysis tables, plots and report of the whole store."""
  from sslbench_jax.analysis import _command_common as analysis_command  # pylint: disable=g-import-not-at-top
  from sslbench_jax.results import store  # pylint: disable=g-import-not-at-top
  out = {"csv": os.path.join(workdir, "results.csv")}
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
  return out


def iterate(config: ml_collections.ConfigDict, workdir: str, progress: workdir_lib.Progress
            ) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
  """Runs every (model, protocol, dataset) step of ``config`` not done for its inputs.

  Every model is converted first (its sidecar is part of its steps' inputs);
  then the feature sets of the steps that will run (none for steps already
  done) are made before any protocol runs, one decode pass per (split,
  effective preprocessing) for up to ``config.extraction.models_per_pass``
  models; then each step runs its protocol on them. A step recorded in
  ``progress`` with other inputs is unmarked and its earlier rows are removed
  from ``DIR/results.jsonl`` (writer) before it runs again; the log says what
  changed.

  Yields:
    ``(step key, step inputs, result rows)`` per step run.
  """
  from sslbench_jax import parallel  # pylint: disable=g-import-not-at-top
  from sslbench_jax.convert import cache as convert_cache  # pylint: disable=g-import-not-at-top
  store_path = os.path.join(workdir, "results.jsonl")
  for name, m in config.models.items():
    if parallel.is_writer():
      convert_cache.ensure_converted(name, m, workdir)
    parallel.sync(f"convert {name}")
  metas = {name: convert_cache.read_sidecar(convert_cache.weights_path(workdir, name))
           for name in config.models}
  steps, wanted = plan.make_plan(config, metas, progress.why_run)
  features = _Features(config, workdir, metas)
  features.make(wanted, uses=[k for s in steps if s.why is not None for k in s.features])
  for step in steps:
    if step.why is None:
      logging.info("%s: done in an earlier run with the same inputs, skipped", step.key)
      continue
    if step.key in progress.done:
      logging.warning("%s: %s", step.key, step.why)
      if parallel.is_writer():
        progress.forget(step.key, store_path)
    else:
      logging.info("%s: running (%s)", step.key, step.why)
    rows = _run_step(config, workdir, step, metas[step.model], features)
    features.release(step.features)
    yield step.key, step.inputs, rows


def _run_step(config: ml_collections.ConfigDict, workdir: str, step: plan.Step,
              weights_meta: dict[str, Any], features: "_Features") -> list[dict[str, Any]]:
  """One step: its protocol (the table) on its inputs; rows labelled for the analysis."""
  from sslbench_jax.convert import cache as convert_cache  # pylint: disable=g-import-not-at-top
  from sslbench_jax.protocols import base
  from sslbench_jax.protocols import registry
  m, p = config.models[step.model], config.protocols[step.protocol]
  protocol = registry.get(p.type)
  options = plan.protocol_options(p, f"config.protocols.{step.protocol}")
  train_split, test_split = plan.model_splits(m, config.datasets[step.dataset])
  context = dict(model=step.model, dataset=test_split.dataset, split=test_split.split,
                 seed=config.seed,
                 weights_path=convert_cache.weights_path(workdir, step.model),
                 weights_meta=weights_meta)
  if protocol.consumes == "images":
    # It trains through the backbone: a directory of its own for checkpoints
    # (resumes an interrupted step).
    context["workdir"] = os.path.join(workdir, "steps", *step.key.split("/"))
    train, test = (base.ImageInputs(s.dataset, s.split, s.data_dir, s.preprocessing)
                   for s in (train_split, test_split))
  elif protocol.consumes == "features":
    train, test = (features.inputs(k) for k in step.features)
  else:  # "logits" / "head": the test split only
    train, test = None, features.inputs(step.features[0])
  result = protocol.run(train, test, options, mesh=None,
                        context=base.RunContext(**context))
  rows = [dict(r) for r in result.rows]
  if protocol.consumes == "logits":
    return rows  # the backbone's own head: protocol "classify", no hparams added
  if protocol.consumes == "head":
    for row in rows:
      row["protocol"] = step.protocol
    return rows
  for row in rows:
    hp = dict(row["hparams"])
    if protocol.consumes == "features":
      hp["representation"] = plan.model_representation(config, m)
    row["hparams"] = dict(hp, checkpoint=m.checkpoint, protocol_type=row["protocol"],
                          train_dataset=train_split.dataset, train_split=train_split.split)
    row["protocol"] = _label(step.protocol, row, options)
  return rows


def _label(proto_name: str, row: dict[str, Any], options: Any) -> str:
  """One protocol label per number the analysis compares across models.

  A kNN entry with several k, or a few-shot entry (several probes x setups),
  yields several numbers per dataset; each gets its own label so analyses never
  average different protocols.
  """
  hp = row["hparams"]
  if row["protocol"] == "knn" and len(getattr(options, "knn_k", ())) > 1:
    return f"{proto_name}_k{hp['k']}"
  if row["protocol"].startswith("fewshot_"):
    return f"{proto_name}_{row['protocol'][len('fewshot_'):]}_{hp['setup']}"
  return proto_name


class _Features:
  """The run's feature sets: made once (extraction passes, derivations), kept in memory.

  Each set is written to ``DIR/features/<tag>.npz`` (the persistent copy, by
  the writer) and kept in memory, as the file reads back, until the last step
  reading it has run (within ``_IN_MEMORY_BYTES``; beyond, a step reads the
  file). Models are loaded once (``features.passes.load_model``) and dropped
  after their last pass.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               metas: dict[str, dict[str, Any]]):
    self.config = config
    self.workdir = workdir
    self.metas = metas
    self.stems = plan.run_stems(config)
    self.sets: dict[plan.FeatureKey, Any] = {}
    self.uses: dict[plan.FeatureKey, int] = {}
    self.parents: set[plan.FeatureKey] = set()  # sets a derivation still reads
    self.held = 0

  def path(self, key: plan.FeatureKey) -> str:
    return os.path.join(self.workdir, "features", f"{plan.feature_tag(key, self.stems)}.npz")

  def _arch(self, model_name: str) -> str:
    return self.metas[model_name].get("arch") or self.config.models[model_name].arch

  def make(self, wanted: list[plan.FeatureKey], uses: list[plan.FeatureKey]) -> None:
    """Makes the ``wanted`` sets: passes, then derived sets, then leftovers.

    ``uses``: the feature keys of every step to run (one entry per read).
    """
    for k in uses:
      self.uses[k] = self.uses.get(k, 0) + 1
    todo = plan.extraction_plan(self.config, wanted, self._arch)
    self.parents = {parent for _, parent in todo.derived}
    self._extract(todo.passes)
    leftover = []
    for key, parent in todo.derived:
      if not self._derive(key, parent):
        leftover.append(key)
    self.parents = set()
    per_pass = self.config.extraction.get("models_per_pass", plan.MODELS_PER_PASS)
    self._extract(plan.extraction_passes(leftover, self._arch, per_pass))
    for key in list(self.sets):  # sets only a derivation read
      if not self.uses.get(key):
        self._drop(key)

  def _extract(self, passes: list[tuple[tuple[Any, ...], list[plan.FeatureKey]]]) -> None:
    from sslbench_jax import parallel  # pylint: disable=g-import-not-at-top
    from sslbench_jax.convert import cache as convert_cache  # pylint: disable=g-import-not-at-top
    from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
    from sslbench_jax.features import passes as passes_lib  # pylint: disable=g-import-not-at-top
    ex = self.config.extraction
    last = {}  # model -> index of its last pass: each model is read from disk once
    for i, (_, group) in enumerate(passes):
      for name, _, _ in group:
        last[name] = i
    loaded: dict[str, Any] = {}
    for n, ((dataset, data_dir, split, preset), group) in enumerate(passes, 1):
      logging.info("features pass %d/%d: %s %s (%s), %d model(s) in one decode pass: %s",
                   n, len(passes), dataset, split, preset, len(group),
                   ", ".join(f"{name}/{r}" for name, _, r in group))
      for name, _, _ in group:
        if name not in loaded:
          loaded[name] = passes_lib.load_model(convert_cache.weights_path(self.workdir, name))
      s = group[0][1]
      results = passes_lib.extract_split(
          [(loaded[name], r, ex.dtype) for name, _, r in group], dataset, split, data_dir,
          s.preprocessing, cache_root=os.path.join(self.workdir, "cache"),
          batch_size_per_device=ex.batch_size_per_device,
          steps_per_shard=ex.steps_per_shard)
      for key, result in zip(group, results):
        fs = result.features
        if parallel.is_writer():
          io.save(self.path(key), fs)
          logging.info("wrote %s: %s features", self.path(key), fs.features.shape)
        self._keep(key, fs)
      # The writer writes the files; the others must not read them before they exist.
      tag = plan.feature_tag(group[0], self.stems)
      parallel.sync(f"features {tag}" + (f" +{len(group) - 1}" if len(group) > 1 else ""))
      for name in [name for name in loaded if last[name] == n - 1]:
        del loaded[name]

  def _derive(self, key: plan.FeatureKey, parent: plan.FeatureKey) -> bool:
    """Cuts ``key`` (e.g. ReaL) out of its parent set (val); False: cannot, extract."""
    from sslbench_jax import parallel  # pylint: disable=g-import-not-at-top
    from sslbench_jax.data import derived  # pylint: disable=g-import-not-at-top
    from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
    _, s, _ = key
    parent_path = self.path(parent)
    fs = derived.derive_features(self._get(parent), s.dataset, s.split, data_dir=s.data_dir,
                                 parent_file=parent_path)
    if fs is None:
      return False
    if parallel.is_writer():
      io.save(self.path(key), fs)
      logging.info("wrote %s: %d %s rows of %s", self.path(key), len(fs.labels), s.dataset,
                   parent_path)
    parallel.sync(f"features {plan.feature_tag(key, self.stems)}")
    self._keep(key, fs)
    return True

  def _keep(self, key: plan.FeatureKey, fs: Any) -> None:
    """Keeps ``fs`` as its file reads back (JSON meta, str ids), if it fits."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
    size = fs.features.nbytes + np.asarray(fs.labels).nbytes
    if (not self.uses.get(key) and key not in self.parents) or (
        self.held + size > _IN_MEMORY_BYTES):
      return  # read from its file when (if) a step needs it
    if io.count_nonfinite_rows(fs.features):
      return  # io.load refuses these rows, naming the file: let it
    self.sets[key] = io.FeatureSet(fs.features, np.asarray(fs.labels),
                                   np.asarray(fs.ids).astype(str),
                                   json.loads(json.dumps(fs.meta, sort_keys=True)))
    self.held += size

  def _get(self, key: plan.FeatureKey) -> Any:
    from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
    if key in self.sets:
      return self.sets[key]
    return io.load(self.path(key))

  def inputs(self, key: plan.FeatureKey) -> Any:
    """A step's ``protocols.base.FeatureInputs`` for feature set ``key`` (in memory)."""
    from sslbench_jax.protocols import base  # pylint: disable=g-import-not-at-top
    fs = self._get(key)
    path = self.path(key)
    name = str(fs.meta.get("representation") or "features")
    return base.FeatureInputs({name: fs.features}, fs.labels, fs.meta, path, (path,))

  def release(self, keys: tuple[plan.FeatureKey, ...]) -> None:
    """One read of each of ``keys`` done; a set nobody reads any more is dropped."""
    for k in keys:
      self.uses[k] = self.uses.get(k, 1) - 1
      if self.uses[k] <= 0:
        self._drop(k)

  def _drop(self, key: plan.FeatureKey) -> None:
    import numpy as np  # pylint: disable=g-import-not-at-top
    fs = self.sets.pop(key, None)
    if fs is not None:
      self.held -= fs.features.nbytes + np.asarray(fs.labels).nbytes
