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
from sslbench_jax import _feature_sets
from sslbench_jax import plan
from sslbench_jax import workdir as workdir_lib

FLAGS = flags.FLAGS

WorkdirBusyError = workdir_lib.WorkdirBusyError
validate = _config_check.validate
check_inputs = _config_check.check_inputs
MODELS_PER_PASS = plan.MODELS_PER_PASS


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
  features = _feature_sets.FeatureSets(config, workdir, metas)
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
              weights_meta: dict[str, Any], features: _feature_sets.FeatureSets
              ) -> list[dict[str, Any]]:
  """One step: its protocol (the table) on its inputs; rows labelled for the analysis."""
  from sslbench_jax.convert import cache as convert_cache  # pylint: disable=g-import-not-at-top
  from sslbench_jax.protocols import base  # pylint: disable=g-import-not-at-top
  from sslbench_jax.protocols import registry  # pylint: disable=g-import-not-at-top
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
