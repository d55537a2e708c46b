"""Exact sharded input: every example read once, every host runs the same steps.

For ``n`` examples, ``num_shards`` hosts and a global batch ``B`` (a multiple of
``num_shards``), each host reads only its own shard and forms local batches of
``b = B / num_shards``:

* ``"contiguous"`` (default): host ``p`` owns the block
  ``[p * ceil(n / P), min(n, (p + 1) * ceil(n / P)))`` - sequential reads of an
  ArrayRecord / folder listing, which is what disks like;
* ``"strided"``: host ``p`` owns ``p, p + P, p + 2P, ...``.

Every host runs ``steps = ceil(ceil(n / P) / b)`` steps (at least 1 when
``n > 0``); positions past the end of a shard hold index ``-1`` with
``mask == False`` (the padded, masked examples of big_vision's evaluators).
So: no duplicates, no drops, equal step counts. The example index travels with
the batch, so outputs can be put back in dataset order after gathering.

Example:
  >>> plan = shard_plan(10, global_batch=4, num_shards=2, shard_index=1)
  >>> plan.indices     # (steps, local_batch) with -1 padding
  array([[ 5,  6], [ 7,  8], [ 9, -1]])
"""

from __future__ import annotations

import dataclasses

import numpy as np

_MODES = ("contiguous", "strided")


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """The batches of one host.

  Attributes:
    indices: int64 ``(steps, local_batch)`` example indices, ``-1`` = padding.
    mask: bool ``(steps, local_batch)``, True for real examples.
    num_examples: size of the whole dataset.
    num_shards: number of hosts.
    shard_index: this host.
    mode: "contiguous" or "strided".
  """
  indices: np.ndarray
  mask: np.ndarray
  num_examples: int
  num_shards: int
  shard_index: int
  mode: str

  @property
  def steps(self) -> int:
    return self.indices.shape[0]

  @property
  def local_batch(self) -> int:
    return self.indices.shape[1]

  def shard_examples(self) -> np.ndarray:
    """The real example indices of this shard, in order."""
    return self.indices[self.mask]


def shard_indices(num_examples: int, num_shards: int, shard_index: int,
                  mode: str = "contiguous") -> np.ndarray:
  """The example indices owned by one shard (no padding).

  Args:
    num_examples: dataset size.
    num_shards: number of shards (hosts).
    shard_index: which shard, in ``[0, num_shards)``.
    mode: "contiguous" or "strided".

  Returns:
    int64 array of indices.
  """
  _check(num_examples, num_shards, shard_index, mode)
  if mode == "strided":
    return np.arange(shard_index, num_examples, num_shards, dtype=np.int64)
  per = -(-num_examples // num_shards)
  start = min(num_examples, shard_index * per)
  stop = min(num_examples, start + per)
  return np.arange(start, stop, dtype=np.int64)


def shard_plan(num_examples: int, global_batch: int, num_shards: int | None = None,
               shard_index: int | None = None, mode: str = "contiguous") -> ShardPlan:
  """Plans the padded, masked batches of one host.

  Args:
    num_examples: dataset size.
    global_batch: examples per step over all hosts; must be a multiple of
      ``num_shards``.
    num_shards: number of hosts; default ``jax.process_count()``.
    shard_index: this host; default ``jax.process_index()``.
    mode: "contiguous" or "strided".

  Returns:
    A ``ShardPlan``.
  """
  if num_shards is None or shard_index is None:
    import jax  # pylint: disable=g-import-not-at-top  (only when defaults are needed)
    num_shards = jax.process_count() if num_shards is None else num_shards
    shard_index = jax.process_index() if shard_index is None else shard_index
  _check(num_examples, num_shards, shard_index, mode)
  if global_batch <= 0 or global_batch % num_shards:
    raise ValueError(f"global_batch={global_batch} must be a positive multiple of "
                     f"num_shards={num_shards}")
  local = global_batch // num_shards
  per_shard = -(-num_examples // num_shards)   # the largest shard decides
  steps = max(1, -(-per_shard // local)) if num_examples else 0
  mine = shard_indices(num_examples, num_shards, shard_index, mode)
  flat = np.full(steps * local, -1, np.int64)
  flat[:len(mine)] = mine
  indices = flat.reshape(steps, local)
  return ShardPlan(indices=indices, mask=indices >= 0, num_examples=num_examples,
                   num_shards=num_shards, shard_index=shard_index, mode=mode)


def _check(num_examples, num_shards, shard_index, mode):
  if mode not in _MODES:
    raise ValueError(f"Unknown shard mode {mode!r}; known: {', '.join(_MODES)}")
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}")
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index} not in [0, num_shards={num_shards})")
