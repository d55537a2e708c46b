"""Parallelism in one place: the device mesh, multi-host helpers, sharded predict.

Every jitted computation of the package runs on a mesh from ``make_mesh``: a
2-D ``(DATA_AXIS, MODEL_AXIS)`` grid over every device of every process.
Batches are sharded over ``DATA_AXIS`` (rows); ``MODEL_AXIS`` is where
parameters may be sharded (FSDP); it has size 1 unless asked for, and then
everything is plain data parallelism.

JAX's multi-controller model: every process runs the same program on its own
share of the data. ``initialize`` must run before anything touches a JAX
backend; ``allgather``, ``broadcast`` and ``sync`` are no-ops in a single
process; only the ``is_writer()`` process writes shared files.

``predict`` is the exact pad + mask forward pass over a stream of host
batches (feature extraction and fine-tuning evaluation use it, or its
pieces ``jit_predict`` / ``shard_batch`` / ``local_rows``): the last, short
batch is padded to the fixed per-process batch, padded rows are dropped from
the output, so every example is evaluated exactly once whatever the device
or process count.

Example:
  >>> mesh = parallel.make_mesh()
  >>> logits = parallel.predict(lambda p, x: model.apply(p, x, train=False),
  ...                           variables, batches, mesh=mesh)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = "data"    # batch rows are split over this axis
MODEL_AXIS = "model"  # parameters may be split over this one (FSDP); size 1 by default
AXES = (DATA_AXIS, MODEL_AXIS)


# -- the mesh -----------------------------------------------------------------


def make_mesh(model_axis_size: int = 1, *,
              devices: Sequence[Any] | None = None) -> Mesh:
  """The ``(DATA_AXIS, MODEL_AXIS)`` mesh over ``devices`` (default: every device
  of every process).

  Axes are ``Auto``: the compiler propagates the input shardings through a
  computation, so models need no sharding annotations.

  Args:
    model_axis_size: devices along ``MODEL_AXIS``; must divide the device count.
      The data axis gets the rest (``len(devices) // model_axis_size``).
    devices: the devices (default ``jax.devices()``).

  Returns:
    A ``jax.sharding.Mesh`` of shape ``(len(devices) // model_axis_size,
    model_axis_size)``.

  Raises:
    ValueError: ``model_axis_size`` < 1 or not a divisor of the device count.
  """
  devices = list(jax.devices() if devices is None else np.asarray(devices).reshape(-1))
  n = len(devices)
  if model_axis_size < 1 or n % model_axis_size:
    raise ValueError(f"model_axis_size={model_axis_size} must be >= 1 and divide "
                     f"the device count {n}")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((n // model_axis_size, model_axis_size), AXES,
                       axis_types=(auto, auto), devices=devices)


def batch_sharding(mesh: Mesh, *trailing: Any) -> NamedSharding:
  """Rows over ``DATA_AXIS`` (``trailing`` = specs of the next dimensions)."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *trailing))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same value on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def local_data_size(mesh: Mesh) -> int:
  """How many ``DATA_AXIS`` positions this process's devices hold.

  A process's local batch must be a multiple of this (one equal slice each).
  """
  me = jax.process_index()
  grid = mesh.devices.reshape(mesh.shape[DATA_AXIS], -1)
  return sum(any(d.process_index == me for d in row) for row in grid)


# -- host <-> device ------------------------------------------------------------


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host arrays -> global arrays replicated over ``mesh`` (every process passes
  the same values). ``jax.Array`` leaves already placed are kept."""
  sharding = replicated(mesh)

  def put(v):
    if isinstance(v, jax.Array) and getattr(v.sharding, "mesh", None) == mesh:
      return v  # already placed (e.g. an FSDP state): keep its layout
    v = np.asarray(v)
    return jax.make_array_from_process_local_data(sharding, v, v.shape)

  return jax.tree.map(put, tree)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """This process's rows -> global arrays sharded over ``DATA_AXIS``.

  Process ``p``'s rows become rows ``[p b, (p + 1) b)`` of the global batch
  (``b`` = the local row count, the same on every process).
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)), tree)


def local_rows(out: jax.Array) -> np.ndarray:
  """This process's rows of a ``DATA_AXIS``-sharded array, in its local order.

  (The inverse of ``shard_batch``; copies replicated over ``MODEL_AXIS`` are
  read once.)
  """
  shards = {s.index[0].start or 0: s for s in out.addressable_shards}
  return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def jit_predict(fn: Callable[[Any, Any], Any], mesh: Mesh,
                params_sharding: Any = None) -> Callable[[Any, Any], Any]:
  """``jax.jit(fn)`` with the batch (and outputs) sharded over ``DATA_AXIS``.

  Args:
    fn: ``fn(params, batch) -> outputs``; row ``i`` of every output depends
      only on row ``i`` of the batch.
    mesh: a ``make_mesh`` mesh.
    params_sharding: the parameters' sharding (a sharding or a pytree of
      them); None keeps the placement of the arrays passed (``replicate``
      for host arrays; FSDP states keep theirs).

  Returns:
    The jitted ``(params, batch) -> outputs``.
  """
  data = batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(params_sharding, data), out_shardings=data)


@functools.lru_cache(maxsize=32)
def _cached_jit(fn, mesh, params_sharding):
  return jit_predict(fn, mesh, params_sharding)


def predict(apply_fn: Callable[[Any, Any], Any], params: Any,
            batches: Iterable[Any], *, mesh: Mesh, masked: bool = False,
            rows: int | None = None, params_sharding: Any = None) -> Any:
  """Exact sharded forward pass over this process's batches; padding dropped.

  Each batch is padded with zero rows to ``rows`` (fixed, so there is one
  compilation), sharded over ``DATA_AXIS`` together with the other
  processes' batches, run through ``jax.jit(apply_fn)`` and read back; the
  padded (and masked-out) rows are dropped. Processes may hold different
  numbers of batches: a process out of batches runs fully padded steps, so
  every process makes the same collective calls.

  Args:
    apply_fn: ``apply_fn(params, batch) -> outputs`` (an array or a pytree of
      arrays with a leading row dimension); rows must be independent
      (e.g. a model in eval mode).
    params: host arrays (replicated onto every device) or arrays already
      placed on ``mesh`` (kept as they are).
    batches: this process's host batches, each an array or a pytree of arrays
      with a common leading size ``b <= rows``; with ``masked``, pairs
      ``(batch, mask)`` whose bool ``mask`` (b,) marks the real rows.
    mesh: a ``make_mesh`` mesh.
    masked: batches come with a mask (see ``batches``).
    rows: rows per process and step (a multiple of ``local_data_size(mesh)``);
      default: the largest first batch over the processes, rounded up to one.
    params_sharding: see ``jit_predict``.

  Returns:
    ``apply_fn``'s outputs for this process's real rows, concatenated in input
    order (NumPy; the same pytree structure as one call's outputs). With no
    batch at all on any process: None.

  Raises:
    ValueError: a batch larger than ``rows``, a bad mask, ``rows`` not a
      multiple of the process's data shards.
  """
  try:
    hash(apply_fn)
    hash(params_sharding)
    fwd = _cached_jit(apply_fn, mesh, params_sharding)
  except TypeError:  # unhashable callable or sharding tree: no reuse
    fwd = jit_predict(apply_fn, mesh, params_sharding)
  unit = local_data_size(mesh)
  multi = jax.process_count() > 1
  it = iter(batches)
  placed = None
  template = None  # a zero batch of `rows` rows (for processes out of batches)
  outs: list[Any] = []
  pending = None   # the step in flight: (outputs, kept rows)
  while True:
    item = next(it, None)
    batch, mask = (None, None) if item is None else (item if masked else (item, None))
    if batch is not None:
      b = len(jax.tree.leaves(batch)[0])
      mask = np.ones(b, bool) if mask is None else np.asarray(mask, bool)
      if mask.shape != (b,):
        raise ValueError(f"predict: mask of shape {mask.shape} for a batch of {b} rows")
    else:
      b = 0
    have = int(batch is not None)
    if rows is None:
      first = allgather(np.array([have, b]))
      if not first[:, 0].any():
        return None
      rows = -(-int(first[:, 1].max()) // unit) * unit
    elif rows % unit:
      raise ValueError(f"predict: rows={rows} is not a multiple of this process's "
                       f"{unit} data shards")
    if multi:
      if not allgather(np.array(have)).any():
        break
    elif not have:
      break
    if have:
      if b > rows:
        raise ValueError(f"predict: a batch of {b} rows exceeds rows={rows}")
      padded = jax.tree.map(lambda v: _pad_rows(np.asarray(v), rows), batch)
      if template is None:
        template = jax.tree.map(np.zeros_like, padded)
    else:
      if template is None:
        raise ValueError("predict: this process has no batch at all while others "
                         "do; give every process at least one (possibly empty) batch")
      padded, mask = template, np.zeros(0, bool)
    if placed is None:
      placed = replicate(params, mesh)
    out = fwd(placed, shard_batch(padded, mesh))
    # One step in flight: read step s - 1 back while step s computes.
    if pending is not None:
      outs.append(_kept_rows(*pending))
    pending = (out, np.flatnonzero(mask))
  if pending is not None:
    outs.append(_kept_rows(*pending))
  if not outs:
    return None
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _kept_rows(out: Any, keep: np.ndarray) -> Any:
  return jax.tree.map(lambda o: local_rows(o)[keep], out)


def _pad_rows(v: np.ndarray, rows: int) -> np.ndarray:
  if len(v) == rows:
    return v
  out = np.zeros((rows,) + v.shape[1:], v.dtype)
  out[:len(v)] = v
  return out


# -- processes ----------------------------------------------------------------


def is_writer() -> bool:
  """True on the one process that writes shared files (process 0)."""
  return jax.process_index() == 0


def process_rows(global_rows: int) -> slice:
  """This process's contiguous slice of ``global_rows`` (a multiple of the
  process count): rows ``[p n / P, (p + 1) n / P)``."""
  p, n = jax.process_index(), jax.process_count()
  if global_rows % n:
    raise ValueError(f"global batch {global_rows} is not divisible by the {n} processes")
  return slice(p * global_rows // n, (p + 1) * global_rows // n)


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts ``jax.distributed`` when several processes are requested.

  Arguments win over the environment variables ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; without either, a SLURM / MPI /
  Cloud TPU environment with more than one process is auto-detected by JAX. On
  CPU, cross-process collectives use gloo (JAX's default).

  Args:
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: index of this process in ``[0, num_processes)``.

  Returns:
    True when ``jax.distributed`` is (now, or already was) initialised, False
    for a single process.

  Raises:
    ValueError: an incomplete or inconsistent set of settings.
  """
  if jax.distributed.is_initialized():
    return True  # e.g. by the caller of a library entry point
  env = os.environ
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if address is None and n in (None, 1) and pid in (None, 0):
    if _cluster_detected():
      logging.info("multi-process cluster environment detected")
      jax.distributed.initialize()
      return True
    return False
  if address is None or n is None or pid is None:
    raise ValueError("multi-process run needs --coordinator_address, "
                     "--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, "
                     f"JAX_NUM_PROCESSES, JAX_PROCESS_ID); got {address!r}, {n}, {pid}")
  if n < 1 or not 0 <= pid < n:
    raise ValueError(f"--process_id {pid} must be in [0, --num_processes={n})")
  if n == 1:
    return False
  logging.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)",
               address, n, pid)
  jax.distributed.initialize(coordinator_address=address, num_processes=n,
                             process_id=pid)
  return True


def allgather(x: np.ndarray) -> np.ndarray:
  """Stacks ``x`` from every process: returns ``(process_count,) + x.shape``."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def broadcast(x: Any) -> Any:
  """Process 0's ``x`` (a pytree of arrays of equal shapes everywhere) on every process."""
  if jax.process_count() == 1:
    return x
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(x))


def sync(name: str) -> None:
  """Barrier: returns once every process has reached ``sync(name)``."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _cluster_detected() -> bool:
  # Launchers whose multi-process jobs ``jax.distributed.initialize()`` can
  # configure by itself (SLURM, Open MPI, Cloud TPU pod slices).
  if _env_int("SLURM_NTASKS", 1) > 1 or _env_int("OMPI_COMM_WORLD_SIZE", 1) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def _env_int(name: str, default: int | None = None) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return default
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
