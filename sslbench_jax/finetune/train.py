"""The training loop: resumable, preemption-safe, evaluated every epoch.

``run(RunConfig)`` trains one (weights, dataset, recipe) into ``workdir``:

* ``metrics.jsonl``: one row per epoch (train loss = mean of the epoch's step
  losses, the epoch's learning rate, test top-1 / top-5 %, step);
* ``result.json``: the last epoch's top-1 / top-5, epochs, steps and the
  provenance (recipe, layer decay, label fraction, subset seed, device and
  process count, precision, weights sha256, dataset, preprocessing, versions);
  its ``timing`` entry is the only part that depends on the machine;
* ``checkpoints/``: orbax checkpoints (state + the loop's bookkeeping: epoch
  loss sums and the metric rows so far) every ``checkpoint_every_steps``
  steps, at every epoch end and on SIGTERM (then the run exits, exit code 1,
  to be resumed); ``tensorboard/``: scalar event files.

Re-running on a finished ``workdir`` with the same configuration returns the
stored result and does nothing; on an unfinished one it restores the latest
checkpoint and continues at that step. The data order, augmentation and drop
path randomness are functions of ``(seed, epoch, step)`` and the loss sums
are kept in the checkpoint, so a resumed run ends with the same parameters,
``metrics.jsonl`` and ``result.json`` (except ``timing``) as an
uninterrupted one. A different configuration in the same ``workdir`` is an
error (exit 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from sslbench_jax import atomic
from sslbench_jax import parallel
from sslbench_jax.backbones import registry
from sslbench_jax.backbones import weights as weights_lib
from sslbench_jax.data import augment as augment_lib
from sslbench_jax.data import preprocess as preprocess_lib
from sslbench_jax.data import registry as data_registry
from sslbench_jax.finetune import _tensorboard
from sslbench_jax.finetune import input as input_lib
from sslbench_jax.finetune import model as model_lib
from sslbench_jax.finetune import optim
from sslbench_jax.finetune import step as step_lib
from sslbench_jax.finetune.recipes import Recipe
from sslbench_jax.probes import fewshot

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Test hook: SIGKILL this process right after the given global step (1-based
# count of finished steps), after any checkpoint due at that step.
KILL_ENV = "SSLBENCH_FINETUNE_KILL_AFTER_STEP"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One fine-tuning run.

  Attributes:
    weights: converted weights ``.npz`` (sidecar gives arch and options).
    dataset: a ``data.DATASETS`` name; trains on "train", tests on "test".
    recipe: the protocol's ``Recipe``.
    workdir: output folder.
    data_dir: the dataset's data dir, if it needs one.
    preprocessing: evaluation preset (default: the architecture's).
    image_size: train crop / eval crop side (default: the preset's crop).
    dtype: "float32" or "bfloat16" compute (parameters stay float32).
    checkpoint_every_steps: checkpoint period in steps (also every epoch end).
    eval_batch_size: global eval batch (padded + masked).
    threads: host threads decoding and augmenting.
    results: optional results store (``.jsonl``) to append top-1/top-5 rows to.
    progress: show a progress bar (process 0).
    train_limit: train on the first N examples only (smoke runs; after the
      few-shot subset).
    test_limit: evaluate on the first N test examples only (smoke runs).
    train_split: the split trained on.
    test_split: the split tested on every epoch.
    param_sharding: "replicated" (default) or "fsdp": the state split over
      the mesh's model axis (``step.fsdp_spec``), for models whose parameters
      and optimizer state do not fit one device (ViT-L).
    model_axis_size: devices of the model axis when ``run`` builds the mesh
      (``parallel.make_mesh``); fsdp needs >= 2.
  """
  weights: str
  dataset: str
  recipe: Recipe
  workdir: str
  data_dir: str | None = None
  preprocessing: str | None = None
  image_size: int | None = None
  dtype: str = "float32"
  checkpoint_every_steps: int = 500
  eval_batch_size: int = 256
  threads: int = 4
  results: str | None = None
  progress: bool = True
  train_limit: int | None = None
  test_limit: int | None = None
  train_split: str = "train"
  test_split: str = "test"
  param_sharding: str = "replicated"
  model_axis_size: int = 1

  def key(self) -> dict[str, Any]:
    """What determines the run's results (compared on re-runs)."""
    return {"weights_sha256": weights_lib.sha256_file(self.weights),
            "dataset": self.dataset, "recipe": self.recipe.to_json(),
            "preprocessing": self.preprocessing, "image_size": self.image_size,
            "dtype": self.dtype, "eval_batch_size": self.eval_batch_size,
            "train_limit": self.train_limit, "test_limit": self.test_limit,
            "device_count": jax.device_count(),
            "splits": [self.train_split, self.test_split],
            "param_sharding": self.param_sharding}


class Preempted(RuntimeError):
  """SIGTERM arrived: the state was checkpointed; re-run to resume."""


def _presets(cfg: RunConfig, arch: str):
  name = cfg.preprocessing or registry.default_preprocessing(arch)
  pc = preprocess_lib.preset_config(name)
  over: dict[str, Any] = {}
  size = cfg.image_size
  if size is not None:
    base_crop = pc.crop or pc.resize or size
    over["crop"] = size
    if pc.resize is not None:
      over["resize"] = max(size, int(round(pc.resize * size / base_crop)))
  eval_pre = preprocess_lib.get_preset(name, **over)
  c = eval_pre.config
  aug = augment_lib.make_train_augment(
      name, size=c.crop or c.resize, pre_resize=c.resize,
      scale=(cfg.recipe.crop_scale_min, 1.0))
  return name, eval_pre, aug


def _load_backbone(cfg: RunConfig):
  variables, meta = weights_lib.load_variables(cfg.weights)
  arch = meta.get("arch")
  if not arch:
    raise ValueError(f"{cfg.weights} has no arch in its sidecar")
  return arch, dict(meta.get("arch_options") or {}), variables, meta


def _merge_backbone(fresh: dict[str, Any], loaded: dict[str, Any], path: str) -> dict:
  """The fresh classifier variables with the loaded backbone in place."""
  out = {}
  for col, tree in fresh.items():
    tree = dict(tree)
    if "backbone" in tree:
      src = loaded.get(col, {})
      want = jax.tree_util.tree_flatten_with_path(tree["backbone"])[0]
      flat_src = {jax.tree_util.keystr(p): v for p, v in
                  jax.tree_util.tree_flatten_with_path(src)[0]}
      leaves = []
      for p, v in want:
        k = jax.tree_util.keystr(p)
        if k not in flat_src:
          raise ValueError(f"{path}: {col}{k} is missing (weights of another "
                           "architecture or options?)")
        if tuple(np.shape(flat_src[k])) != tuple(v.shape):
          raise ValueError(f"{path}: {col}{k} has shape {np.shape(flat_src[k])}, "
                           f"the model needs {tuple(v.shape)}")
        leaves.append(jnp.asarray(flat_src[k], jnp.float32))
      tree["backbone"] = jax.tree_util.tree_unflatten(
          jax.tree_util.tree_structure(tree["backbone"]), leaves)
    out[col] = tree
  return out


def train_indices(labels: np.ndarray, num_classes: int, recipe: Recipe) -> np.ndarray:
  """The training examples of a protocol: all, or the few-shot subset.

  The few-shot subset is the cached few-shot probe's
  (``probes.fewshot.sample_subset`` with ``fraction=recipe.label_fraction``,
  ``seed=recipe.subset_seed``, ``trial=0``): ``int(f * N / C)`` examples of
  every class, without replacement, so both protocols train on one subset.
  """
  if recipe.protocol != "fewshot":
    return np.arange(len(labels))
  return fewshot.sample_subset(labels, num_classes, fraction=recipe.label_fraction,
                               seed=recipe.subset_seed, trial=0)


def _first(ds: Any, n: int) -> Any:
  """The first ``n`` examples of ``ds`` (a smoke-run test set)."""
  from sslbench_jax.data import dataset as dataset_lib  # pylint: disable=import-outside-toplevel
  src = dataset_lib.SubsetSource(ds.source, list(range(min(n, len(ds)))))
  return dataset_lib.Dataset(src, ds.label_space, name=ds.name, split=ds.split,
                             preprocessing=ds.preprocessing)


def restore_state(workdir: str, step: int | None = None) -> dict[str, Any]:
  """The checkpointed train state of ``workdir`` (latest step by default), NumPy."""
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{workdir} has no checkpoint")
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=jax.sharding.SingleDeviceSharding(
            jax.local_devices()[0])), book=ocp.args.JsonRestore()))
    # (The fallback places arrays saved on another topology on one local device.)
    return {"step": step, "state": jax.device_get(out["state"]), "book": out["book"]}
  finally:
    manager.close()


def _local(x: jax.Array) -> np.ndarray:
  """A replicated array's value (also when it spans other processes' devices)."""
  return np.asarray(x.addressable_data(0))


def _versions() -> dict[str, str]:
  import flax, optax  # pylint: disable=import-outside-toplevel,multiple-imports
  return {"jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax": ocp.__version__}


class _Terminate:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler
      self._old = None
    return self

  def _handle(self, *_):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _quiet_orbax() -> None:
  # orbax logs every save/restore step at INFO through absl; keep its warnings.
  handler = logging.get_absl_handler()
  if not any(getattr(f, "_sslbench_orbax", False) for f in handler.filters):
    def keep(record) -> bool:
      return "orbax" not in record.pathname or record.levelno >= logging.converter.STANDARD_WARNING
    keep._sslbench_orbax = True  # type: ignore[attr-defined]
    handler.addFilter(keep)


def run(cfg: RunConfig, *, mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Trains and evaluates; returns the ``result.json`` content (see module doc).

  Args:
    cfg: the run.
    mesh: a ``parallel.make_mesh`` mesh (None: ``make_mesh(cfg.model_axis_size)``).

  Raises:
    ValueError: bad input (unknown dataset, weights, sizes, a workdir holding
      another configuration).
    Preempted: SIGTERM received; the state is checkpointed.
  """
  r = cfg.recipe
  _quiet_orbax()
  if cfg.dtype not in DTYPES:
    raise ValueError(f"dtype {cfg.dtype!r}; known: {', '.join(DTYPES)}")
  if cfg.checkpoint_every_steps < 1:
    raise ValueError(f"checkpoint_every_steps must be >= 1, got {cfg.checkpoint_every_steps}")
  arch, arch_options, loaded, wmeta = _load_backbone(cfg)
  key = cfg.key()
  result_path = os.path.join(cfg.workdir, "result.json")
  key_path = os.path.join(cfg.workdir, "run_key.json")
  if os.path.exists(key_path):
    with open(key_path) as f:
      old = json.load(f)
    if old != key:
      diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
      raise ValueError(f"{cfg.workdir} holds a run of another configuration "
                       f"(differs in {', '.join(diff)}); use a new --workdir")
    if os.path.exists(result_path):
      with open(result_path) as f:
        logging.info("%s is finished; nothing to do", cfg.workdir)
        return json.load(f)

  train_ds = data_registry.open_dataset(cfg.dataset, cfg.train_split, data_dir=cfg.data_dir)
  test_ds = data_registry.open_dataset(cfg.dataset, cfg.test_split, data_dir=cfg.data_dir)
  num_classes = train_ds.label_space.num_classes
  train_labels = input_lib.read_labels(train_ds)
  test_labels = input_lib.read_labels(test_ds)
  indices = train_indices(train_labels, num_classes, r)
  if cfg.train_limit is not None:
    indices = indices[:cfg.train_limit]
  if cfg.test_limit is not None:
    test_ds = _first(test_ds, cfg.test_limit)
    test_labels = test_labels[:len(test_ds)]
  mesh = parallel.make_mesh(cfg.model_axis_size) if mesh is None else mesh
  ndev = mesh.devices.size
  nshard = mesh.shape[parallel.DATA_AXIS]  # batch rows are split this many ways
  unit = nshard * r.accum_steps
  if r.batch_size % unit:
    raise ValueError(f"batch_size {r.batch_size} is not a multiple of data shards x "
                     f"accum_steps = {nshard} x {r.accum_steps}")
  if len(indices) < r.batch_size:
    # A few-shot subset smaller than one batch: one full-subset batch per step.
    smaller = len(indices) // unit * unit
    if smaller < 1:
      raise ValueError(f"{len(indices)} training examples cannot fill a batch of "
                       f"{unit} (data shards x accum_steps)")
    logging.warning("batch_size %d > %d training examples: using batch %d",
                    r.batch_size, len(indices), smaller)
    r = dataclasses.replace(r, batch_size=smaller)
  preset_name, eval_pre, aug = _presets(cfg, arch)
  train_in = input_lib.TrainInput(train_ds, indices, train_labels, aug, r.batch_size,
                                  r.seed, threads=cfg.threads)
  spe = train_in.steps_per_epoch
  total = spe * r.epochs
  eval_batch = -(-cfg.eval_batch_size // nshard) * nshard

  model = model_lib.build(arch, num_classes, head_bn=r.head_bn, drop_path=r.drop_path,
                          dtype=DTYPES[cfg.dtype], arch_options=arch_options)
  fresh = model_lib.init_variables(model.clone(backbone=model.backbone.clone(
      dtype=jnp.float32)), r.seed)
  variables = _merge_backbone(jax.device_get(fresh), loaded, cfg.weights)
  trainable, _ = step_lib.split_trainable(r, variables["params"])
  tx = optim.make_optimizer(r, arch, trainable, spe)
  c = eval_pre.config
  steps = step_lib.Steps(model, r, tx, mesh, c.mean, c.std, DTYPES[cfg.dtype],
                         param_sharding=cfg.param_sharding)
  state = steps.init_state(variables)

  os.makedirs(cfg.workdir, exist_ok=True)
  if parallel.is_writer():
    atomic.write_json(key_path, key)
  ckpt_dir = os.path.abspath(os.path.join(cfg.workdir, "checkpoints"))
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True, enable_async_checkpointing=False))
  book = {"step": 0, "loss_sum": 0.0, "loss_count": 0, "rows": []}
  latest = manager.latest_step()
  if latest is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), book=ocp.args.JsonRestore()))
    state, book = restored["state"], dict(restored["book"])
    logging.info("resuming %s at step %d of %d", cfg.workdir, book["step"], total)
  metrics_path = os.path.join(cfg.workdir, "metrics.jsonl")
  if parallel.is_writer():
    atomic.write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in book["rows"]))
  tb = _tensorboard.EventWriter(os.path.join(cfg.workdir, "tensorboard")) \
      if parallel.is_writer() else None

  def save(step_done: int) -> None:
    book["step"] = step_done
    manager.save(step_done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), book=ocp.args.JsonSave(dict(book))),
        force=True)
    manager.wait_until_finished()

  def evaluate() -> tuple[float, float]:
    batches = (((x, y), m) for x, y, m in input_lib.eval_batches(
        test_ds, test_labels, eval_pre.geometry, eval_batch, cfg.threads))
    hits = parallel.predict(steps.eval_hits, state, batches, mesh=mesh, masked=True)
    mine = np.zeros(3, np.int64) if hits is None else np.append(hits.sum(0), len(hits))
    hits1, hits5, n = (int(v) for v in parallel.allgather(mine).sum(0))
    if n != len(test_ds):
      raise RuntimeError(f"evaluated {n} of {len(test_ds)} test examples")
    return 100.0 * hits1 / n, 100.0 * hits5 / n

  kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
  t0 = time.time()
  start = book["step"]
  bar = tqdm.tqdm(total=total, initial=start, unit="step", smoothing=0.05,
                  desc=f"finetune {r.protocol}",
                  disable=not cfg.progress or not parallel.is_writer())
  losses: list[jax.Array] = []
  try:
    with _Terminate() as term, bar:
      for step, x, y in train_in.iterate(start, total):
        xs = jax.make_array_from_process_local_data(steps.data, x)
        ys = jax.make_array_from_process_local_data(steps.data, y)
        state, loss = steps.train(state, xs, ys)
        losses.append(loss)
        done = step + 1
        bar.update(1)
        epoch_end = done % spe == 0
        if epoch_end or done % cfg.checkpoint_every_steps == 0 or term.requested:
          # Same float order as an uninterrupted run: per step, in sequence.
          for l in losses:
            book["loss_sum"] += float(_local(l))
          book["loss_count"] += len(losses)
          losses = []
        if epoch_end:
          epoch = done // spe - 1
          top1, top5 = evaluate()
          row = {"epoch": epoch + 1, "step": done,
                 "train_loss": book["loss_sum"] / max(book["loss_count"], 1),
                 "lr": optim.current_lr(r, step, spe), "top1": top1, "top5": top5}
          book["rows"].append(row)
          book["loss_sum"], book["loss_count"] = 0.0, 0
          bar.set_postfix(loss=f"{row['train_loss']:.3f}", top1=f"{top1:.1f}")
          logging.info("epoch %d/%d: %s", epoch + 1, r.epochs, row)
          if parallel.is_writer():
            with open(metrics_path, "a") as f:
              f.write(json.dumps(row) + "\n")
            tb.scalars(done, {k: row[k] for k in ("train_loss", "lr", "top1", "top5")})
        if epoch_end or done % cfg.checkpoint_every_steps == 0 or term.requested:
          save(done)
        if kill_after and done == kill_after:
          os.kill(os.getpid(), signal.SIGKILL)
        if term.requested and done < total:
          raise Preempted(f"SIGTERM at step {done} of {total}: checkpointed in "
                          f"{ckpt_dir}; re-run the same command to resume")
  finally:
    train_in.close()
    manager.close()

  last = book["rows"][-1]
  result = {
      "top1": last["top1"], "top5": last["top5"], "epochs": r.epochs, "steps": total,
      "protocol": r.protocol, "arch": arch, "dataset": cfg.dataset,
      "n_train": int(len(indices)), "n_test": len(test_ds),
      "recipe": r.to_json(), "layer_decay": r.layer_decay,
      "label_fraction": r.label_fraction, "subset_seed": r.subset_seed
      if r.protocol == "fewshot" else None,
      "abs_lr": r.abs_lr(), "abs_head_lr": r.abs_lr(head=True),
      "device_count": ndev, "process_count": jax.process_count(),
      "precision": {"params": "float32", "compute": cfg.dtype, "loss": "float32"},
      "param_sharding": cfg.param_sharding,
      "model_axis_size": int(mesh.shape[parallel.MODEL_AXIS]),
      "weights": os.path.abspath(cfg.weights), "weights_sha256": key["weights_sha256"],
      "weights_source": wmeta.get("source", ""), "preprocessing": preset_name,
      "eval_preprocessing": dataclasses.asdict(eval_pre.config),
      "train_augmentation": dataclasses.asdict(aug.config),
      "versions": _versions(),
      "timing": {"seconds_this_session": round(time.time() - t0, 3),
                 "resumed_from_step": start},
  }
  if parallel.is_writer():
    atomic.write_json(result_path, result)
    if cfg.results:
      _append_results(cfg, result)
  return result


# Recipe fields recorded in every results row (the rest are fixed by these).
_ROW_RECIPE = ("epochs", "batch_size", "optimizer", "lr", "head_lr", "momentum",
               "weight_decay", "warmup_epochs", "clip_norm", "label_smoothing",
               "layer_decay", "drop_path", "head_bn", "frozen_bn", "backbone_bn",
               "label_fraction", "fewshot_setup", "subset_seed", "accum_steps",
               "crop_scale_min")


def result_rows(cfg: RunConfig, result: dict[str, Any], *, model: str | None = None,
                dataset: str | None = None, split: str | None = None
                ) -> list[dict[str, Any]]:
  """The results-store rows (``top1``, ``top5``) of a finished run.

  ``protocol`` is ``finetune_<recipe.protocol>`` (the protocol table's name);
  ``hparams`` holds the provenance: the recipe as run (few-shot: the batch
  actually used), label fraction and subset seed, precision, image size,
  preprocessing, training-set size and steps; ``device_count`` the devices.

  Args:
    cfg: the run's configuration.
    result: its ``result.json`` content (``run``'s return value).
    model: the row's model name (default: the weights file's stem).
    dataset: the row's dataset name (default: ``cfg.dataset``).
    split: the row's split name (default: ``cfg.test_split``).
  """
  rec = result["recipe"]
  hparams = {k: rec[k] for k in _ROW_RECIPE}
  if rec["protocol"] != "fewshot":
    hparams["subset_seed"] = None  # no subset: the field is not used
  hparams.update(seed=rec["seed"], precision=cfg.dtype, image_size=cfg.image_size,
                 preprocessing=result["preprocessing"], n_train=result["n_train"],
                 steps=result["steps"], train_split=cfg.train_split,
                 train_limit=cfg.train_limit, test_limit=cfg.test_limit,
                 weights_source=result["weights_source"])
  name = model or os.path.splitext(os.path.basename(cfg.weights))[0]
  return [{"model": name, "checkpoint_sha256": result["weights_sha256"],
           "dataset": dataset or cfg.dataset, "split": split or cfg.test_split,
           "protocol": f"finetune_{rec['protocol']}", "hparams": hparams,
           "metric": m, "value": result[m], "n_examples": result["n_test"],
           "seed": rec["seed"], "device_count": result["device_count"]}
          for m in ("top1", "top5")]


def _append_results(cfg: RunConfig, result: dict[str, Any]) -> None:
  from sslbench_jax.results import store  # pylint: disable=import-outside-toplevel
  store.append_results(cfg.results, result_rows(cfg, result))


def config_digest(cfg: RunConfig) -> str:
  """A short stable hash of the run's key (the protocol table's run directory name)."""
  return hashlib.sha256(json.dumps(cfg.key(), sort_keys=True).encode()).hexdigest()[:12]
