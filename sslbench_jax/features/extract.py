"""Data-parallel, sharded, resumable feature extraction over all devices of all processes.

The forward pass is ``parallel.jit_predict`` over ``parallel.make_mesh()``
(every device of every process): the batch is sharded over
``parallel.DATA_AXIS``, the variables are replicated. Each process decodes
its own block of the dataset (``data.sharding.shard_plan`` via
``cache.Layout``), builds its part of the global batch
(``parallel.shard_batch``) and reads back the rows its own devices produced,
in its own row order (``parallel.local_rows``). Batches past the end of a
block are zero-padded; padded rows are dropped on the host (the pad + mask of
``parallel.predict``), so every example is evaluated exactly once and every
process runs the same number of steps.

With a cache, each process writes its rows in checksummed shards every
``steps_per_shard`` steps; a rerun reuses every valid shard and computes only
the missing ones (all processes compute the union of what any process misses,
since the jitted step is collective, and each writes only its own). The
writer process (``parallel.is_writer``) writes the manifest. The result is the
same ``FeatureSet`` on every process.

``extract_many`` runs several models that share a preprocessing in one pass:
each batch is decoded and transferred once and fed to every model's forward
pass; each model keeps its own cache entry and resumes from its own shards.

Example:
  >>> model = registry.create_model("resnet50")
  >>> result = extract(model, variables, source, preprocess.get_preset(
  ...     "imagenet_bilinear"), cache_root="/cache", key=key)
  >>> result.features.features.shape
  (50000, 2048)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from sslbench_jax import parallel
from sslbench_jax.features import _pipeline
from sslbench_jax.features import cache as cache_lib
from sslbench_jax.features import io as features_io

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_GATHER_ROWS = 1 << 16  # rows per cross-process all-gather (bounds device memory)


@dataclasses.dataclass(frozen=True)
class ExtractStats:
  """What one ``extract`` call did (per process).

  Attributes:
    num_shards: shards of this process in the current layout (or, for a
      complete entry read back whole, all the entry's shards).
    shards_reused: valid shards read back from the cache (hits).
    shards_computed: shards run through the model (the union over processes of
      what is missing, so it can exceed this process's own misses).
    shards_written: shards this process wrote (its misses).
    from_complete_entry: True when a complete entry was loaded as a whole.
    seconds: wall time.
    input: when images were computed: ``_pipeline.InputTimer.summary()``
      (seconds the loop waited for decoded batches, seconds it computed, and
      whether it was input-bound); None otherwise.
  """
  num_shards: int
  shards_reused: int
  shards_computed: int
  shards_written: int
  from_complete_entry: bool
  seconds: float
  input: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class ExtractResult:
  """What ``extract`` returns.

  Attributes:
    features: every kept example, in dataset order, with provenance meta.
    stats: cache hits / misses of this call.
    entry_dir: the cache entry directory, None without a cache.
  """
  features: features_io.FeatureSet
  stats: ExtractStats
  entry_dir: str | None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One model of an ``extract_many`` pass.

  Attributes:
    model: a Flax module following the backbone contract.
    variables: its variables (host arrays).
    representation: key of the model output to keep.
    dtype: compute dtype, "float32" or "bfloat16".
    key: the ``CacheKey`` of its features (required with a cache).
    meta: provenance for its FeatureSet (see ``extract``).
  """
  model: Any
  variables: Any
  representation: str = "pre_logits"
  dtype: str = "float32"
  key: cache_lib.CacheKey | None = None
  meta: dict[str, Any] | None = None


def extract(model: Any, variables: Any, source: Any,
            preprocess: Callable[[Any], np.ndarray] | None = None,
            *, representation: str = "pre_logits", dtype: str = "float32",
            batch_size_per_device: int = 64, num_threads: int | None = None,
            cache_root: str | None = None, key: cache_lib.CacheKey | None = None,
            steps_per_shard: int = 16, meta: dict[str, Any] | None = None,
            progress: bool = True, prefetch: int = 2,
            on_shard_written: Callable[[int], None] | None = None,
            decode_backend: str = "threads",
            mesh: jax.sharding.Mesh | None = None) -> ExtractResult:
  """Computes ``representation`` for every example of ``source``.

  Args:
    model: a Flax module following the backbone contract
      (``apply(variables, images_nhwc, train=False)`` -> dict of arrays).
    variables: its variables (host arrays; replicated onto every device).
    source: ``len(source)`` and ``source.get(i) -> {"image", "label", "id"
      [, "mask"]}``: a ``data.dataset.Dataset`` (float32 images, already
      preprocessed), or raw PIL / uint8 images (e.g. ``ImageFolder``).
      Examples with ``mask`` False are dropped and listed in the meta.
    preprocess: for raw images, PIL image -> float32 (H, W, 3); None when the
      source preprocesses. When it has ``geometry`` (-> uint8) and
      ``config.mean/std`` (``data.preprocess`` presets), uint8 pixels are
      shipped and normalised on device.
    representation: key of the model output to keep; (B, ...) outputs are
      flattened to (B, D).
    dtype: compute dtype, "float32" or "bfloat16" (features are float32).
    batch_size_per_device: rows per device and step.
    num_threads: decode workers (default: CPU count, at most 32).
    cache_root: cache directory; None disables caching.
    key: the ``CacheKey`` of these features; required with ``cache_root``.
    steps_per_shard: steps per cache shard of each process.
    meta: provenance for the FeatureSet; completes (and overrides) what the
      ``key`` says, e.g. a plain dataset name.
    progress: show a tqdm bar on process 0.
    prefetch: batches kept ready on device.
    on_shard_written: called with the shard index after each shard this
      process writes (progress hooks; tests use it to kill the run).
    decode_backend: "threads" or "processes" (``_pipeline``): same pixels,
      same order.
    mesh: a ``parallel.make_mesh`` mesh (default: every device on the data
      axis); rows are split over ``parallel.DATA_AXIS``, variables replicated.

  Returns:
    ``ExtractResult``: the ``FeatureSet`` (dataset order, padding dropped),
    the cache statistics and the cache entry directory.

  Raises:
    ValueError: empty source, unknown representation or dtype, bad sizes.
  """
  hook = None if on_shard_written is None else (lambda _, k: on_shard_written(k))
  return extract_many(
      [ModelSpec(model, variables, representation, dtype, key, meta)], source,
      preprocess, batch_size_per_device=batch_size_per_device,
      num_threads=num_threads, cache_root=cache_root,
      steps_per_shard=steps_per_shard, progress=progress, prefetch=prefetch,
      on_shard_written=hook, decode_backend=decode_backend, mesh=mesh)[0]


def extract_many(models: Sequence[ModelSpec], source: Any,
                 preprocess: Callable[[Any], np.ndarray] | None = None, *,
                 batch_size_per_device: int = 64, num_threads: int | None = None,
                 cache_root: str | None = None, steps_per_shard: int = 16,
                 progress: bool = True, prefetch: int = 2,
                 on_shard_written: Callable[[int, int], None] | None = None,
                 decode_backend: str = "threads",
                 mesh: jax.sharding.Mesh | None = None) -> list[ExtractResult]:
  """``extract`` for several models sharing one preprocessing, in one decode pass.

  Every batch is decoded and transferred to the devices once and fed to each
  model's own jitted forward pass (same mesh, same batch sharding). Each model
  keeps its own cache entry (its ``key``), exactly as ``extract`` would write
  it, and computes only the shards its entry misses: models whose entries are
  complete are read back, and a resumed pass decodes the union of the steps
  the models still need, feeding each model only its own missing steps.

  Args:
    models: the models (``ModelSpec``: module, variables, representation,
      dtype, cache key, meta).
    source: see ``extract``.
    preprocess: see ``extract``; shared by all models.
    batch_size_per_device: rows per device and step.
    num_threads: decode workers (default: CPU count, at most 32).
    cache_root: cache directory; None disables caching.
    steps_per_shard: steps per cache shard of each process.
    progress: show a tqdm bar (decoded images) on process 0.
    prefetch: batches kept ready on device.
    on_shard_written: called with (model index, shard index) after each
      shard this process writes.
    decode_backend: "threads" or "processes".
    mesh: see ``extract``.

  Returns:
    One ``ExtractResult`` per model, in order (each equal to what ``extract``
    returns for that model alone).

  Raises:
    ValueError: no models, empty source, unknown representation or dtype,
      bad sizes.
  """
  t0 = time.time()
  models = list(models)
  if not models:
    raise ValueError("extract_many needs at least one model")
  for spec in models:
    if spec.dtype not in DTYPES:
      raise ValueError(f"Unknown dtype {spec.dtype!r}; known: {', '.join(DTYPES)}")
  if decode_backend not in _pipeline.DECODE_BACKENDS:
    raise ValueError(f"Unknown decode_backend {decode_backend!r}; known: "
                     f"{', '.join(_pipeline.DECODE_BACKENDS)}")
  if batch_size_per_device < 1 or steps_per_shard < 1:
    raise ValueError("batch_size_per_device and steps_per_shard must be >= 1")
  for spec in models:
    if cache_root is not None and spec.key is None:
      raise ValueError("a cache needs a CacheKey (key=...)")
  n = len(source)
  if n == 0:
    raise ValueError("the image source is empty")
  for spec in models:
    if spec.key is not None and (spec.key.representation, spec.key.dtype) != (
        spec.representation, spec.dtype):
      raise ValueError(f"cache key says {spec.key.representation}/{spec.key.dtype}, "
                       f"extraction asks for {spec.representation}/{spec.dtype}")
  process, num_processes = jax.process_index(), jax.process_count()
  mesh = parallel.make_mesh() if mesh is None else mesh
  rows = batch_size_per_device * parallel.local_data_size(mesh)
  layout = cache_lib.Layout(n, num_processes, rows, steps_per_shard,
                            versions=tuple(sorted(_versions().items())))
  results: list[ExtractResult | None] = [None] * len(models)
  metas, directories = [], []
  # A registry dataset describes itself (its label space included): every
  # feature file carries what scoring needs, whoever calls.
  described = source.describe() if hasattr(source, "describe") else None
  for i, spec in enumerate(models):
    run_meta = _provenance(spec.key, spec.meta, spec.representation, spec.dtype)
    if run_meta.get("source") is None and described is not None:
      run_meta["source"] = described
    directory = cache_lib.entry_dir(cache_root, spec.key) if cache_root else None
    metas.append(run_meta)
    directories.append(directory)
    if directory is not None:
      complete, num_cached = _load_complete(directory, spec.key)
      if _everyone(complete is not None):
        stats = ExtractStats(num_cached, num_cached, 0, 0, True, time.time() - t0)
        _log_stats(directory, stats)
        results[i] = ExtractResult(complete, stats, directory)
  if all(r is not None for r in results):
    return results

  pixels_fn, normalize = _split_preprocess(preprocess)
  load = _pipeline.example_loader(source, pixels_fn)
  first, first_label, _, _ = load(0)
  label_template = np.asarray(first_label)
  tag = layout.tag()
  runs = []
  for i, spec in enumerate(models):
    if results[i] is not None:
      continue
    forward = _Forward(spec.model, spec.variables, spec.representation, spec.dtype,
                       normalize, mesh, first.shape, first.dtype)
    directory = directories[i]
    hits: dict[int, tuple[str, str, dict[str, np.ndarray]]] = {}
    if directory is not None:
      previous = cache_lib.read_manifest(directory)
      hits = cache_lib.scan_shards(directory, tag, process)
      if previous is not None and previous.get("status") != "complete":
        _log_resume(directory, previous, len(hits), layout.num_shards, process)
    own_missing = np.array([k not in hits for k in range(layout.num_shards)])
    to_compute = [int(k) for k in
                  np.flatnonzero(parallel.allgather(own_missing).any(0))]
    if directory is not None and parallel.is_writer():
      cache_lib.write_manifest(directory, _manifest(spec.key, layout, metas[i],
                                                    forward.feature_dim, None))
    runs.append(_ModelRun(i, spec.key, metas[i], directory, forward, hits,
                          to_compute, layout, label_template))
  try:
    _compute(t0, layout, runs, load, first, steps_per_shard, num_threads,
             prefetch, progress, on_shard_written, decode_backend)
  except BaseException as e:
    # The entries stay resumable (their shards are checksummed), and their
    # manifests say why they stopped instead of claiming a run is still going.
    for r in runs:
      if r.directory is not None and parallel.is_writer() and not r.finalized:
        _mark_interrupted(r.directory, r.key, layout, r.run_meta,
                          r.forward.feature_dim, e)
    raise
  for r in runs:
    results[r.index] = r.result
  return results


class _ModelRun:
  """One model's side of a decode pass: its shards, pending rows and entry."""

  def __init__(self, index, key, run_meta, directory, forward, hits, to_compute,
               layout, label_template):
    self.index, self.key, self.run_meta = index, key, run_meta
    self.directory, self.forward, self.layout = directory, forward, layout
    self.label_template = label_template
    self.hits, self.to_compute = hits, to_compute
    self.steps = {s for k in to_compute for s in layout.shard_steps(k)}
    self.parts = {k: arrays for k, (_, _, arrays) in hits.items()}
    self.written = {k: (name, digest) for k, (name, digest, _) in hits.items()}
    self.pending: dict[int, list[dict[str, np.ndarray]]] = {}
    self.finalized = False
    self.result = None

  def finish(self, batch: _pipeline.Batch, feats: np.ndarray, steps_per_shard: int,
             tag: str, process: int, hook) -> None:
    shard = batch.step // steps_per_shard
    self.pending.setdefault(shard, []).append(dict(
        features=feats[batch.keep], index=batch.positions[batch.keep],
        labels=batch.labels, ids=batch.ids, skipped=batch.skipped))
    if batch.step != self.layout.shard_steps(shard)[-1]:
      return
    arrays = _concat_rows(self.pending.pop(shard), self.forward.feature_dim,
                          self.label_template)
    if shard in self.parts:
      return  # another process was missing this shard; ours is on disk already
    self.parts[shard] = arrays
    if self.directory is not None:
      self.written[shard] = cache_lib.write_shard(self.directory, tag, process,
                                                  shard, arrays)
      if hook is not None:
        hook(self.index, shard)


def _compute(t0, layout, runs, load, first, steps_per_shard, num_threads, prefetch,
             progress, on_shard_written, decode_backend="threads") -> None:
  """Decode the union of the runs' missing steps once; forward, write, gather each."""
  process, num_processes = jax.process_index(), jax.process_count()
  plan = layout.plan(process)
  tag = layout.tag()
  shards = sorted({k for r in runs for k in r.to_compute})
  steps = [s for k in shards for s in layout.shard_steps(k)]
  my_images = int((plan.indices[steps] >= 0).sum())
  # The bar counts every process's images (process 0's, scaled): an estimate
  # that is exact but for the uneven padding of the last steps.
  bar = tqdm.tqdm(total=my_images * num_processes, unit="img", unit_scale=True,
                  smoothing=0.1, desc="features",
                  disable=not progress or not parallel.is_writer() or not steps)
  timer = _pipeline.InputTimer()
  workers = num_threads or min(32, os.cpu_count() or 1)
  # Every forward pass shards its batch over the same mesh the same way, so
  # the first one's transfer serves all of them.
  batches = _pipeline.device_batches(
      steps, lambda s: plan.indices[s], load, first.shape, first.dtype,
      runs[0].forward.to_device, workers, depth=prefetch,
      decode_backend=decode_backend, timer=timer)

  def finish(item):
    batch, outs = item
    for r, out in outs:
      r.finish(batch, r.forward.local_rows(out), steps_per_shard, tag, process,
               on_shard_written)
    bar.update(int((batch.positions >= 0).sum()) * num_processes)

  previous = None
  timer.start()
  # One step in flight: dispatch step s to every model, then read back step s - 1.
  for batch in batches:
    images, batch.device = batch.device, None
    outs = [(r, r.forward(images)) for r in runs if batch.step in r.steps]
    del images
    if previous is not None:
      finish(previous)
    previous = (batch, outs)
  if previous is not None:
    finish(previous)
  timer.stop()
  bar.close()
  input_summary = timer.summary() if steps else None
  if steps:
    logging.info("features: process %d waited %.1fs for decoded batches (%d %s) "
                 "and computed %.1fs (forward of %d model(s), read-back, writes): %s",
                 process, input_summary["input_wait_seconds"], workers,
                 decode_backend, input_summary["compute_seconds"], len(runs),
                 "input-bound" if input_summary["input_bound"] else "compute-bound")

  for r in runs:
    fs = _gather(r.parts, layout, r.forward.feature_dim, r.run_meta)
    if r.directory is not None:
      _finalize(r.directory, r.key, layout, r.run_meta, r.forward.feature_dim,
                r.written)
    r.finalized = True
    seconds = time.time() - t0
    if r.steps:
      mine = int((plan.indices[sorted(r.steps)] >= 0).sum())
      logging.info("features: process %d put %d images through %s in %.1fs: "
                   "%.1f images/s", process, mine, r.run_meta["representation"],
                   seconds, mine / seconds)
    stats = ExtractStats(layout.num_shards, len(r.hits), len(r.to_compute),
                         len(r.written) - len(r.hits), False, seconds,
                         input_summary if r.steps else None)
    if r.directory is not None:
      _log_stats(r.directory, stats)
    r.result = ExtractResult(fs, stats, r.directory)


class _Forward:
  """The jitted, sharded forward pass and its host<->device plumbing."""

  def __init__(self, model, variables, representation, dtype, normalize, mesh,
               pixel_shape, pixel_dtype):
    compute = DTYPES[dtype]
    if compute != jnp.float32 and "dtype" in getattr(model, "__dataclass_fields__", {}):
      # Mixed precision the module supports: float32 parameters, bf16 compute.
      model = model.clone(dtype=compute)
    elif compute != jnp.float32:
      variables = jax.tree.map(
          lambda v: v.astype(compute) if jnp.issubdtype(v.dtype, jnp.floating) else v,
          variables)
    try:
      hash(model)
      factory = _jitted_forward
    except TypeError:  # a module with unhashable attributes: no reuse
      factory = _jitted_forward.__wrapped__
    self._fwd = factory(model, representation, dtype, normalize, mesh)
    self.mesh = mesh
    self.variables = parallel.replicate(
        jax.tree.map(np.asarray, variables), mesh)
    probe = jax.ShapeDtypeStruct((len(mesh.devices.flat),) + tuple(pixel_shape),
                                 pixel_dtype)
    self.feature_dim = int(jax.eval_shape(self._fwd, self.variables, probe).shape[1])

  def to_device(self, images: np.ndarray) -> jax.Array:
    return parallel.shard_batch(images, self.mesh)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self._fwd(self.variables, images)

  local_rows = staticmethod(parallel.local_rows)


@functools.lru_cache(maxsize=32)
def _jitted_forward(model, representation, dtype, normalize, mesh):
  """Cached per (model, representation, dtype, normalisation, mesh): one trace each."""
  compute = DTYPES[dtype]

  def fwd(variables, images):
    x = images
    if normalize is not None:
      mean, std = (np.asarray(v, np.float32) for v in normalize)
      x = (x.astype(jnp.float32) / jnp.float32(255.0) - mean) / std
    out = model.apply(variables, x.astype(compute), train=False)
    if representation not in out:
      raise ValueError(f"Unknown representation {representation!r}; this model "
                       f"returns: {', '.join(sorted(out))}")
    feats = out[representation]
    return feats.reshape(feats.shape[0], -1).astype(jnp.float32)

  return parallel.jit_predict(fwd, mesh, parallel.replicated(mesh))


def _split_preprocess(preprocess):
  """(host pixels fn or None, on-device normalisation or None)."""
  if preprocess is None:
    return None, None  # the source preprocesses (e.g. a data.dataset.Dataset)
  config = getattr(preprocess, "config", None)
  if hasattr(preprocess, "geometry") and hasattr(config, "mean"):
    # uint8 pixels cross to the device (4x less traffic); normalise there.
    return preprocess.geometry, (tuple(map(float, config.mean)),
                                 tuple(map(float, config.std)))
  return (lambda img: np.asarray(preprocess(img), np.float32)), None


def _concat_rows(rows: list[dict[str, Any]], dim: int,
                 label_template: np.ndarray) -> dict[str, np.ndarray]:
  labels = [l for r in rows for l in r["labels"]]
  return dict(
      features=np.concatenate([r["features"] for r in rows]).astype(
          np.float32).reshape(-1, dim),
      index=np.concatenate([r["index"] for r in rows]).astype(np.int64),
      labels=(np.asarray(labels, label_template.dtype) if labels else
              np.zeros((0,) + label_template.shape, label_template.dtype)),
      ids=np.asarray([i for r in rows for i in r["ids"]], dtype=str),
      skipped=np.asarray([i for r in rows for i in r["skipped"]], np.int64))


def _gather(parts, layout, dim, meta) -> features_io.FeatureSet:
  """Every process's shards -> the full FeatureSet on every process."""
  local = [parts[k] for k in sorted(parts)]
  if layout.num_processes > 1:
    local = _allgather_rows({k: np.concatenate([p[k] for p in local])
                             for k in local[0]}, layout)
  return cache_lib.assemble(local, layout.num_examples, dim, meta)


def _allgather_rows(mine: dict[str, np.ndarray], layout) -> list[dict[str, np.ndarray]]:
  """All-gathers one process's rows; returns one dict per process.

  Row counts differ between processes, so everything is padded to the largest
  possible count (a process's plan size) and cut back after the gather; ids
  travel as zero-padded UTF-8 bytes.
  """
  width = layout.num_steps * layout.rows_per_process
  counts = parallel.allgather(np.array([len(mine["index"]), len(mine["skipped"])]))
  ids = [i.encode("utf-8") for i in mine["ids"]]
  id_len = int(parallel.allgather(np.array(max(map(len, ids), default=1))).max())
  id_bytes = np.frombuffer(b"".join(i.ljust(id_len, b"\0") for i in ids),
                           np.uint8).reshape(len(ids), id_len)

  def pad(a):
    out = np.zeros((width,) + a.shape[1:], a.dtype)
    out[:len(a)] = a
    return out

  fields = dict(features=mine["features"], index=mine["index"], labels=mine["labels"],
                ids=id_bytes, skipped=mine["skipped"])
  gathered = {k: np.concatenate([parallel.allgather(pad(v)[i:i + _GATHER_ROWS])
                                 for i in range(0, width, _GATHER_ROWS)], axis=1)
              for k, v in fields.items()}
  out = []
  for p, (kept, skipped) in enumerate(counts):
    out.append(dict(
        features=gathered["features"][p, :kept], index=gathered["index"][p, :kept],
        labels=gathered["labels"][p, :kept], skipped=gathered["skipped"][p, :skipped],
        ids=np.asarray([bytes(r).rstrip(b"\0").decode("utf-8")
                        for r in gathered["ids"][p, :kept]], dtype=str)))
  return out


def _finalize(directory, key, layout, run_meta, dim, written) -> None:
  """The writer records every process's shards; stale layouts are removed."""
  tag = layout.tag()
  own = np.zeros((layout.num_shards, 32), np.uint8)
  for k, (_, digest) in written.items():
    own[k] = np.frombuffer(bytes.fromhex(digest), np.uint8)
  digests = parallel.allgather(own)
  shards = []
  for p in range(layout.num_processes):
    for k in range(layout.num_shards):
      digest = bytes(digests[p, k]).hex()
      shards.append(dict(file=cache_lib.shard_name(tag, p, k, digest),
                         process=p, shard=k, sha256=digest))
  keep = {s["file"] for s in shards}
  if parallel.is_writer():
    cache_lib.write_manifest(directory, _manifest(key, layout, run_meta, dim, shards))
  parallel.sync("sslbench_features_manifest")
  cache_lib.remove_stale(directory, keep,
                         None if parallel.is_writer() else jax.process_index())


def _manifest(key, layout, run_meta, dim, shards, error=None) -> dict[str, Any]:
  out = dict(format=cache_lib.CACHE_FORMAT_VERSION, key=key.as_dict(),
             key_digest=key.digest(),
             layout=dict(dataclasses.asdict(layout), tag=layout.tag()),
             meta=run_meta, num_examples=layout.num_examples, feature_dim=dim,
             status="running" if shards is None else "complete",
             shards=shards or [])
  if error is not None:
    out.update(status="interrupted", error=error)
  return out


def _mark_interrupted(directory, key, layout, run_meta, dim, e) -> None:
  """Writer: the manifest of a failed run says ``interrupted`` and why."""
  msg = str(e).strip()
  error = f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}".rstrip(": ")
  try:
    cache_lib.write_manifest(directory, _manifest(key, layout, run_meta, dim, None,
                                                  error))
  except OSError as write_error:  # e.g. the disk that made the run fail is full
    logging.warning("feature cache %s: could not record the interruption: %s",
                    directory, write_error)


def _log_resume(directory, previous, reused, num_shards, process) -> None:
  """Says that an earlier run of this entry did not finish, and what is reused."""
  why = (f"; it stopped on: {previous['error']}" if previous.get("error")
         else " (killed, or still running elsewhere)")
  logging.warning("feature cache %s: resuming an interrupted extraction%s; %d of "
                  "%d shards of process %d reused", directory, why, reused,
                  num_shards, process)


def _load_complete(directory, key) -> tuple[features_io.FeatureSet | None, int]:
  """A complete, verified entry (whatever layout wrote it) and its shard count."""
  manifest = cache_lib.read_manifest(directory)
  if not manifest or manifest.get("status") != "complete":
    return None, 0
  if manifest.get("key") != key.as_dict():
    logging.warning("cache entry %s belongs to another key; recomputing", directory)
    return None, 0
  try:
    return cache_lib.load_entry(directory), len(manifest["shards"])
  except (ValueError, FileNotFoundError) as e:
    logging.warning("complete cache entry unusable (%s); resuming shard by shard", e)
    return None, 0


def _everyone(flag: bool) -> bool:
  return bool(parallel.allgather(np.array(flag)).all())


def _provenance(key, meta, representation, dtype) -> dict[str, Any]:
  # The key's fields, refined by the caller's meta (e.g. a plain dataset name
  # where the key also holds its location), then what this run measured.
  out = {}
  if key is not None:
    out.update(arch=key.arch, arch_options=key.arch_options,
               weights_sha256=key.weights_sha256, dataset=key.dataset,
               split=key.split, preprocessing=key.preprocessing,
               cache_key=key.digest())
  out.update(meta or {})
  out.update(representation=representation, dtype=dtype,
             device_count=jax.device_count(), process_count=jax.process_count(),
             versions=_versions())
  return out


def _versions() -> dict[str, str]:
  import sslbench_jax  # pylint: disable=g-import-not-at-top
  out = {"jax": jax.__version__, "sslbench_jax": sslbench_jax.__version__}
  for dist in ("jaxlib", "flax", "numpy", "pillow"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def _log_stats(directory: str, stats: ExtractStats) -> None:
  logging.info("feature cache %s: %d/%d shards reused (hits), %d computed, %d written "
               "by process %d%s, %.1fs", directory, stats.shards_reused,
               stats.num_shards, stats.shards_computed, stats.shards_written,
               jax.process_index(),
               " [complete entry]" if stats.from_complete_entry else "",
               stats.seconds)
