"""Exact top-k (cosine or Euclidean) through a bfloat16 screen and a certificate.

Why: a bfloat16 x bfloat16 matmul accumulated in float32 runs 3-4x faster
than a float32 one on CPUs with AMX / AVX512-BF16 (measured in BENCHMARKS.md)
and on accelerators, where a float32 ``Precision.HIGHEST`` product costs
several bfloat16 passes. The similarity matmul is most of a kNN search.

Per query chunk and device (the bank block split into shards as in ``knn``):

1. Screen: ``s_b = bf16(q) . bf16(x)`` for every bank row; keep the ``m`` best
   of every shard, then the ``m`` best of the device (``lax.top_k``).
2. Re-rank: the ``m`` candidates' float32 dot products ``q . x`` (one gather of
   ``m`` rows per query, ``Precision.HIGHEST``); keep the best ``k``; merge the
   devices' lists into the global top-k (ties: lower training index).
3. Certify: a row that is not a candidate has ``s_b <= b`` (b: the smallest
   kept screened value, or -inf when nothing was left out), so its float32
   similarity is at most ``b + eps``, where ``eps`` bounds ``|s_f32 - s_b|``
   rigorously (below). If ``max over devices (b + eps)`` is below the k-th
   re-ranked similarity, no other row can enter the top-k: the result is
   exactly the top-k of the float32 similarities over the whole bank.
   Queries without the certificate are answered by the float32 search.

Error bound. ``qh = bf16(q)`` and ``ql = q - qh`` (exact in float32: the
residual of rounding to fewer bits is representable), same for ``x``; then
``q.x - qh.xh = ql.x + qh.xl``, so ``|q.x - qh.xh| <= |ql||x| + |qh||xl|``
(Cauchy-Schwarz). Products of two bfloat16 numbers are exact in float32, and a
float32 sum of D terms in any order is within ``gamma_D * sum |terms|`` of the
exact sum, ``gamma_D = D u / (1 - D u)``, ``u = 2^-24`` (Higham, "Accuracy and
Stability of Numerical Algorithms", eq. 3.5); hence
``|s_b - qh.xh| <= gamma_D |qh||xh|`` and ``|s_f32 - q.x| <= gamma_D |q||x|``.
We use ``eps = |ql| X + |qh| Xl + 2 gamma_D (|qh| Xh + |q| X) + 1e-30`` with
``X, Xh, Xl`` the largest ``|x|, |xh|, |xl|`` of the device's rows, every norm
inflated by ``1 + 2 gamma_D`` for its own rounding; the factor 2 on the
accumulation term leaves room for blocked/FMA accumulation schemes and the
1e-30 covers flushed subnormal products.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from sslbench_jax import parallel
from sslbench_jax.probes import _shard_top_k


def gamma(dim: int) -> float:
  """Higham's gamma_D for float32: bound on the relative error of a D-term sum."""
  du = dim * 2.0 ** -24
  return du / (1.0 - du)


def candidates(k: int) -> int:
  """Default number of screened candidates for a top-``k`` search.

  The certificate fails when more than ``m - k`` rows lie within ``eps`` of
  the k-th similarity; half of k (at least 16) of slack, rounded up to 8,
  certifies nearly every query on real features and costs ~1.5 k re-ranked
  rows per query.
  """
  m = k + max(k // 2, 16)
  return -(-m // 8) * 8


def _split_norms(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Row norms of x, of its bfloat16 rounding xh, and of the residual x - xh."""
  high = x.astype(jnp.bfloat16).astype(jnp.float32)
  return (jnp.linalg.norm(x, axis=1), jnp.linalg.norm(high, axis=1),
          jnp.linalg.norm(x - high, axis=1))


def error_bound(queries: jax.Array, stats: jax.Array) -> jax.Array:
  """Per query, a bound on ``|fl32(q.x) - fl32(bf16(q).bf16(x))|`` over rows x.

  Args:
    queries: (q, D) float32.
    stats: (3,) max |x|, |bf16(x)|, |x - bf16(x)| over the rows (``bank_stats``).

  Returns:
    (q,) float32 ``eps`` of the module docstring.
  """
  dim = queries.shape[-1]
  slack = 2.0 * gamma(dim)
  inflate = 1.0 + 2.0 * gamma(dim)
  nq, nqh, nql = (n * inflate for n in _split_norms(queries))
  x, xh, xl = stats[0] * inflate, stats[1] * inflate, stats[2] * inflate
  return nql * x + nqh * xl + slack * (nqh * xh + nq * x) + 1e-30


@functools.lru_cache(maxsize=32)
def bank_stats(mesh: Mesh):
  """Jitted bank -> (n_devices, 3): per device max |x|, |bf16(x)|, |x - bf16(x)|."""

  def per_device(bank):
    return jnp.stack([jnp.max(n) for n in _split_norms(bank)])[None]

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(parallel.DATA_AXIS),
                               out_specs=P(parallel.DATA_AXIS), check_vma=False))


@functools.lru_cache(maxsize=32)
def bank_sqnorms(mesh: Mesh):
  """Jitted bank -> (rows,) float32 squared norms, sharded like the bank."""
  return jax.jit(jax.shard_map(lambda b: jnp.sum(jnp.square(b), axis=1),
                               mesh=mesh, in_specs=P(parallel.DATA_AXIS),
                               out_specs=P(parallel.DATA_AXIS), check_vma=False))


@functools.lru_cache(maxsize=32)
def screened_search(mesh: Mesh, n_train: int, rows: int, shard: int, m: int,
                    k_max: int, dim: int, metric: str = "cosine"):
  """Jitted (bank32, bank16, stats, sqnorms, queries) -> (keys, indices, certified).

  ``keys`` ascending, (q, k_max): -similarity ("cosine") or the Euclidean
  distance computed as ``sqrt(sum((q - x)^2))`` ("euclidean", as the float32
  search re-ranks); ``indices`` global training indices; ``certified`` (q,)
  bool, True where the result is provably the top-k of those float32 values
  over the whole bank. ``sqnorms`` (``bank_sqnorms``) is used by "euclidean"
  only. Cached per shape.

  Euclidean screening ranks rows by ``2 s_b - |x|^2`` (``|q - x|^2`` up to the
  query's constant); a row left out has a real ``2 q.x - |x|^2`` at most
  ``left + E``, ``E = 2 eps + 2 gamma_D X^2`` (the second term: the float32
  ``|x|^2``), so its real squared distance is at least
  ``|q|^2 - left - E``, and its float32 one at least ``(1 - c)`` times that,
  ``c = 3u + 2 gamma_D`` (rounding of the differences, squares and sum). The
  query is certified when that exceeds the k-th re-ranked distance squared
  (times ``1 + 8u`` for the square root's rounding).
  """
  euclidean = metric == "euclidean"
  n_shards = rows // shard
  m = min(m, rows)
  k_local = min(k_max, m)
  u = 2.0 ** -24
  g = gamma(dim)

  def per_device(bank32, bank16, stats, sqnorms, queries):
    offset = jax.lax.axis_index(parallel.DATA_AXIS) * rows
    qh = queries.astype(jnp.bfloat16)
    eps = error_bound(queries, stats[0])
    if euclidean:
      x_max = stats[0, 0] * (1.0 + 2.0 * g)
      eps = 2.0 * eps + 2.0 * g * x_max * x_max
    blocks = bank16.reshape(n_shards, shard, dim)
    sq_blocks = sqnorms.reshape(n_shards, shard)

    def score(inputs, s):
      block, sq = inputs
      sims = jnp.einsum("qd,sd->qs", qh, block,
                        preferred_element_type=jnp.float32)
      if euclidean:
        sims = 2.0 * sims - sq[None, :]
      local = s * shard + jnp.arange(shard, dtype=jnp.int32)
      return jnp.where((offset + local < n_train)[None, :], sims, -jnp.inf)

    _, pos, left = _shard_top_k.block_top_k(score, (blocks, sq_blocks),
                                            n_shards, shard, m)
    # Index order, so that the re-rank's top_k breaks ties by lower index.
    pos = jnp.sort(pos, axis=1)

    def rerank(inputs):
      query, rows_idx = inputs
      cand = bank32[rows_idx]
      if euclidean:
        return -jnp.sqrt(jnp.sum(jnp.square(query[None, :] - cand), axis=1))
      return jnp.dot(cand, query, precision=jax.lax.Precision.HIGHEST)

    exact = jax.lax.map(rerank, (queries, pos))
    exact = jnp.where(offset + pos < n_train, exact, -jnp.inf)
    best, sel = jax.lax.top_k(exact, k_local)
    idx = offset + jnp.take_along_axis(pos, sel, axis=1)
    keys, idx = _shard_top_k.gather_top_k(-best, idx, k_max)
    bound = jnp.max(jax.lax.all_gather(left + eps, parallel.DATA_AXIS, axis=0), axis=0)
    kth = jnp.max(keys, axis=1)
    if euclidean:
      q2 = jnp.sum(jnp.square(queries), axis=1) * (1.0 - 2.0 * g)
      lower = (1.0 - (3.0 * u + 2.0 * g)) * (q2 - bound)
      certified = lower > kth * kth * (1.0 + 8.0 * u)
    else:
      certified = bound < -kth                        # the k-th similarity
    return keys, idx, certified

  return jax.jit(jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(parallel.DATA_AXIS),) * 4 + (P(),),
      out_specs=(P(), P(), P()), check_vma=False))
