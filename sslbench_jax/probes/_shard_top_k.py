"""Top-k of a device's bank block, shard by shard, and across devices.

Shared by the float32 search (``knn._local_top_k``) and the bfloat16 screen
(``_knn_screen.screened_search``). Ties: ``lax.top_k`` keeps the lower
position among equal values, and positions follow the bank's row order, so
ties go to the lower training index.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sslbench_jax import parallel


def block_top_k(score: Callable[[Any, jax.Array], jax.Array], shards: Any,
                n_shards: int, shard: int, k: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The ``k`` best scores of a block whose scores are computed per shard.

  Each shard gives its exact top-min(k, shard) (one ``lax.top_k``); the shard
  lists are concatenated in shard order and cut to k once (no running merge).

  Args:
    score: ``(shard_inputs, s) -> (q, shard)`` float32 scores of shard ``s``,
      larger is better, rows to ignore at -inf.
    shards: pytree of arrays with leading dimension ``n_shards`` (each shard's
      ``shard_inputs``).
    n_shards: number of shards.
    shard: rows per shard.
    k: scores to keep, at most ``n_shards * shard``.

  Returns:
    ``(values, positions, left)``: (q, k) best scores (ordered within a shard,
    not across), their positions in the block (``s * shard + column``), and
    (q,) an upper bound of every score not returned (-inf if none was left).
  """
  k_shard = min(k, shard)

  def one(inputs):
    shard_inputs, s = inputs
    values, pos = jax.lax.top_k(score(shard_inputs, s), k_shard)
    # (XLA:CPU turns top_k + a slice of its last column into a full sort;
    # min over the row is the same number without that slow path.)
    left = (jnp.min(values, axis=1) if k_shard < shard
            else jnp.full(values.shape[:1], -jnp.inf, values.dtype))
    return values, s * shard + pos, left

  if n_shards == 1:
    return one((jax.tree.map(lambda a: a[0], shards), jnp.int32(0)))
  values, pos, left = jax.lax.map(
      one, (shards, jnp.arange(n_shards, dtype=jnp.int32)))
  q = values.shape[1]
  values = jnp.transpose(values, (1, 0, 2)).reshape(q, n_shards * k_shard)
  pos = jnp.transpose(pos, (1, 0, 2)).reshape(q, n_shards * k_shard)
  left = jnp.max(left, axis=0)
  if n_shards * k_shard > k:
    values, sel = jax.lax.top_k(values, k)
    pos = jnp.take_along_axis(pos, sel, axis=1)
    left = jnp.maximum(left, jnp.min(values, axis=1))
  return values, pos, left


def gather_top_k(keys: jax.Array, indices: jax.Array,
                 k: int) -> tuple[jax.Array, jax.Array]:
  """Global top-k from every device's list (inside ``shard_map`` over ``parallel.DATA_AXIS``).

  Args:
    keys: (q, k_local) this device's keys (smaller is better).
    indices: (q, k_local) their global training indices.
    k: how many to keep.

  Returns:
    (q, k) keys ascending, ties by lower index, and their indices.
  """
  keys = jax.lax.all_gather(keys, parallel.DATA_AXIS, axis=1, tiled=True)
  indices = jax.lax.all_gather(indices, parallel.DATA_AXIS, axis=1, tiled=True)
  keys, indices = jax.lax.sort((keys, indices), dimension=1, num_keys=2)
  return keys[:, :k], indices[:, :k]
