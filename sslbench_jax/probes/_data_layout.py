"""Where the linear probe's training features live: sharded on the devices or streamed.

"resident": each device holds a contiguous block of ``ceil(N / devices)``
rows (the last block zero-padded). A mini-batch is a set of rows drawn from
every block, so each epoch the host builds, per step and per device, the
*local* indices of the batch rows that device owns (padded with masked slots
to the largest such count, ``cap``); every device gathers its own rows and the
loss and BatchNorm sums are reduced across devices. The batches are exactly
those of the seeded epoch order; only the order of the rows inside a batch
(hence the float summation order) depends on the device count. The padding
costs ``cap / (batch / devices)`` more rows of compute per step (about 1.3x
for batch 1024 over 8 devices, 1.0x on one device).

"streamed": the features stay on the host; each epoch the host gathers the
rows of a chunk of consecutive steps in batch order and transfers them, each
device receiving its contiguous ``batch / devices`` slice of every step. At
most two chunks are on the devices at a time (the one being trained on and
the next one).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sslbench_jax import parallel

_CAP_MULTIPLE = 8   # rounds the per-device slot count (fewer distinct compiles)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one training pass places its features.

  Attributes:
    mode: "resident" or "streamed".
    n: training examples.
    n_devices: devices of the mesh.
    batch_size: examples per step.
    steps: steps per epoch.
    rows_per_device: resident: rows of each device's block.
    padded_batch: streamed: the batch rounded up to a multiple of n_devices.
    chunk_steps: streamed: steps per transferred chunk.
    device_bytes: feature bytes per device (the block, or two chunks).
  """
  mode: str
  n: int
  n_devices: int
  batch_size: int
  steps: int
  rows_per_device: int
  padded_batch: int
  chunk_steps: int
  device_bytes: int


def plan(n: int, steps: int, batch_size: int, n_devices: int, row_bytes: int,
         budget: int | None) -> Layout:
  """Resident unless ``budget`` bytes per device cannot hold one block."""
  rows = -(-n // n_devices)
  padded_batch = -(-batch_size // n_devices) * n_devices
  if budget is None or rows * row_bytes <= budget:
    return Layout("resident", n, n_devices, batch_size, steps, rows, padded_batch,
                  steps, rows * row_bytes)
  step_bytes = padded_batch // n_devices * row_bytes
  chunk = int(max(1, min(steps, budget // 2 // step_bytes)))
  return Layout("streamed", n, n_devices, batch_size, steps, rows, padded_batch,
                chunk, 2 * chunk * step_bytes)


def _bounds(sl: slice, size: int) -> tuple[int, int]:
  start, stop, _ = sl.indices(size)
  return start, stop


def put_rows(x: np.ndarray, rows_per_device: int, mesh: Mesh) -> jax.Array:
  """(rows_per_device * devices, D) float32 array, row blocks over the data axis.

  Each process transfers only the blocks of its own devices.
  """
  n, d = x.shape
  total = rows_per_device * mesh.shape[parallel.DATA_AXIS]

  def block(index):
    start, stop = _bounds(index[0], total)
    out = np.zeros((stop - start, d), np.float32)
    real = x[start:min(stop, n)]
    out[:len(real)] = real
    return out

  return jax.make_array_from_callback((total, d), parallel.batch_sharding(mesh),
                                      block)


def _put_table(table: np.ndarray, mesh: Mesh) -> jax.Array:
  """(steps, devices * cap) table, columns over the data axis (every process has it all)."""
  return jax.make_array_from_callback(
      table.shape, NamedSharding(mesh, P(None, parallel.DATA_AXIS)), lambda i: table[i])


def local_tables(order: np.ndarray, labels: np.ndarray, layout: Layout,
                 mesh: Mesh) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per step and device: local row indices, labels and validity of the batch.

  Step t's batch is ``order[t*B:(t+1)*B]``; the rows a device owns keep their
  batch order. Returns three (steps, devices * cap) arrays sharded over their
  columns: int32 indices into the device's block, int32 labels, bool mask.
  """
  n, b, nd = layout.n, layout.batch_size, layout.n_devices
  steps, rows = layout.steps, layout.rows_per_device
  key = (np.arange(n) // b) * nd + order // rows
  sort = np.argsort(key, kind="stable")
  counts = np.bincount(key, minlength=steps * nd)
  cap = -(-max(int(counts.max()), 1) // _CAP_MULTIPLE) * _CAP_MULTIPLE
  skey = key[sort]
  rank = np.arange(n) - (np.cumsum(counts) - counts)[skey]
  step, dev = skey // nd, skey % nd
  rows_sorted = order[sort]
  idx = np.zeros((steps, nd, cap), np.int32)
  y = np.zeros((steps, nd, cap), np.int32)
  mask = np.zeros((steps, nd, cap), bool)
  idx[step, dev, rank] = rows_sorted - dev * rows
  y[step, dev, rank] = labels[rows_sorted]
  mask[step, dev, rank] = True
  shape = (steps, nd * cap)
  return (_put_table(idx.reshape(shape), mesh), _put_table(y.reshape(shape), mesh),
          _put_table(mask.reshape(shape), mesh))


def stream_chunk(host: dict[str, np.ndarray], labels: np.ndarray,
                 order: np.ndarray, start: int, stop: int, layout: Layout,
                 mesh: Mesh) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """Steps [start, stop) of the epoch: source -> (k, B', D) rows, (k, B') labels, mask.

  B' is the batch padded with masked rows to a multiple of the device count;
  each device receives (and each process gathers) only its slice of the rows.
  """
  n, b, bp = layout.n, layout.batch_size, layout.padded_batch
  pos = np.arange(start * b, stop * b).reshape(stop - start, b)
  valid = pos < n
  rows = np.where(valid, order[np.minimum(pos, n - 1)], 0)
  if bp > b:
    rows = np.pad(rows, ((0, 0), (0, bp - b)))
    valid = np.pad(valid, ((0, 0), (0, bp - b)))
  y = np.where(valid, labels[rows], 0).astype(np.int32)
  col = NamedSharding(mesh, P(None, parallel.DATA_AXIS))
  xs = {}
  for s, x in host.items():
    def block(index, x=x):
      r, v = rows[index[0], index[1]], valid[index[0], index[1]]
      return np.where(v[..., None], x[r], 0).astype(np.float32)
    xs[s] = jax.make_array_from_callback((stop - start, bp, x.shape[1]),
                                         NamedSharding(mesh, P(None, parallel.DATA_AXIS, None)),
                                         block)
  return (xs, jax.make_array_from_callback(y.shape, col, lambda i: y[i]),
          jax.make_array_from_callback(valid.shape, col, lambda i: valid[i]))
