"""k-nearest-neighbour classification of cached features.

Two protocols:

* ``metric="cosine"`` is DINO's weighted kNN (Caron et al. 2021,
  ``eval_knn.knn_classifier``): features are L2-normalised, the ``k`` most
  cosine-similar training examples vote for their class with weight
  ``exp(sim / T)`` (T = 0.07), and the votes are summed per class.
* ``metric="euclidean"`` is the "A Closer Look at Benchmarking Self-supervised
  Pre-training" protocol (scikit-learn ``KNeighborsClassifier(n_neighbors=20,
  weights="distance")``): plain Euclidean distance, votes weighted by
  ``1 / distance``; when a query has training examples at distance exactly 0,
  only those vote, with weight 1 each (scikit-learn's rule). Optional
  per-dimension z-scoring with the training mean/std (std 0 -> 1).

All ``ks`` are answered from ONE search of ``max(ks)`` neighbours. The search
is memory-bounded: queries are processed in chunks, the training bank is split
row-wise over the devices and, on each device, into as few shards as a memory
budget allows (one (chunk, shard) similarity block of at most
``SIMILARITY_BUDGET_BYTES``). Every shard gives its own exact top-k (one matmul,
one ``lax.top_k``); the shards' lists are concatenated and cut to k once, and
the per-device lists are merged into the global top-k. The full
``N_test x N_train`` matrix never exists (unless it fits the budget). With
``bank_shard=None`` the budget holds on every path, whatever ``query_chunk``:
the query chunk is cut to fit it, including for the float32 search that
answers the queries a bfloat16 screen could not certify.

Search over a float32 bank can screen (``screen``; by default when the bank
is large): candidates come from a bfloat16 matmul (3-4x faster than
float32 on AMX CPUs and accelerators), are re-ranked with float32 dot
products, and a rigorous error bound certifies per query that no other row
can enter the top-k; uncertified queries are recomputed by the float32
search. For cosine the neighbours are those of the float32 similarities
either way (``_knn_screen`` has the proof); for Euclidean the screened search
returns the top-k of the directly computed float32 distances over the whole
bank, while the float32 search picks its k by the expanded form
``2 q.x - |x|^2`` before computing those distances, so the two can differ
only on near-ties at the k-th place (float32 rounding of the expanded form).

Tie rules (deterministic, independent of the device count and chunk sizes):
  * neighbours: among equal similarities/distances the training example with
    the LOWER index comes first (as a stable sort of the training set would);
  * ``k > N_train`` uses all ``N_train`` training examples;
  * classes: ``argmax`` of the scores picks the lowest class index among equal
    scores (as ``numpy.argmax`` and scikit-learn do). Classes with no vote have
    score 0, and top-5 never counts such a class (``metrics.scoring.topk_correct(
    ..., positive_only=True)``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from sslbench_jax import parallel
from sslbench_jax.probes import _knn_screen
from sslbench_jax.probes import _rows
from sslbench_jax.probes import _selection
from sslbench_jax.probes import _shard_top_k
from sslbench_jax.protocols.base import (POSITIVE, FeatureInputs, Protocol,
                                         ProtocolResult, RunContext, check_options,
                                         option)

METRICS = ("cosine", "euclidean")
BANK_DTYPES = ("float32", "bfloat16")
# Largest (query chunk x bank shard) float32 similarity block per device when
# ``bank_shard`` is not given. Bigger shards mean fewer top-k passes; 128 MB
# keeps a 1024-query chunk against 32k bank rows in one matmul.
SIMILARITY_BUDGET_BYTES = 128 << 20
# ``screen=None`` screens (float32 bank) when a device holds at least
# this many bank rows per screened candidate: the bfloat16 matmul saves ~15 ns
# per (query, row) on CPU, the float32 re-rank costs ~1.3 us per candidate
# (BENCHMARKS.md), so screening pays from ~90 rows per candidate there.
SCREEN_MIN_ROWS_PER_CANDIDATE = 96
# ... and keeps screening after the first query chunk only if at least this
# fraction of its queries was certified (the others cost a float32 search).
SCREEN_MIN_CERTIFIED = 0.5


@dataclasses.dataclass(frozen=True)
class Options:
  """The kNN protocol's options; defaults: DINO's weighted kNN (Caron et al.
  2021, ``eval_knn.py``: cosine, T = 0.07, k = 10, 20, 100, 200). "A Closer
  Look at Benchmarking Self-supervised Pre-training" uses ``knn_k=(20,),
  knn_metric="euclidean"`` (with and without ``zscore``)."""
  knn_k: tuple[int, ...] = option(
      (10, 20, 100, 200), "kNN: numbers of neighbours", check=POSITIVE)
  knn_metric: str = option("cosine", "kNN: cosine (DINO) or euclidean (Closer Look)",
                           choices=METRICS)
  knn_temperature: float = option(0.07, "kNN: DINO's temperature (cosine only)",
                                  check=POSITIVE)
  zscore: bool = option(False, "kNN: z-score features with training statistics first")
  bank_dtype: str = option("float32", "kNN: bank storage, float32 or bfloat16",
                           choices=BANK_DTYPES)
  query_chunk: int = option(1024, "kNN: test examples per step",
                            check=POSITIVE)

  def __post_init__(self):
    check_options(self)


def classify(train_features: np.ndarray,
             train_labels: np.ndarray,
             test_features: np.ndarray,
             num_classes: int,
             ks: Sequence[int] = (10, 20, 100, 200),
             metric: str = "cosine",
             temperature: float = 0.07,
             zscore: bool = False,
             *,
             query_chunk: int = 1024,
             bank_shard: int | None = None,
             bank_dtype: str = "float32",
             devices: Sequence[jax.Device] | None = None,
             screen: bool | None = None,
             screen_candidates: int | None = None,
             progress: bool = True,
             ) -> dict[int, np.ndarray]:
  """Scores every class for every test example by weighted kNN voting.

  Args:
    train_features: (N_train, D) training representations.
    train_labels: (N_train,) integer labels in ``[0, num_classes)``.
    test_features: (N_test, D) representations to classify.
    num_classes: number of classes C.
    ks: numbers of neighbours; all are answered from one top-``max(ks)``.
    metric: "cosine" (DINO: L2-normalise, weights exp(sim / temperature)) or
      "euclidean" (Closer Look: weights 1 / distance, sklearn's zero rule).
    temperature: DINO's T, used by "cosine" only.
    zscore: standardise every dimension with the training mean and std
      (std 0 replaced by 1) before anything else.
    query_chunk: test examples per step (bounds memory; any value works;
      "euclidean" caps it so its (chunk, k, D) re-ranking block is <= 64 MB).
    bank_shard: training rows per matmul on a device (bounds memory); default
      None: as many as ``SIMILARITY_BUDGET_BYTES`` allows.
    bank_dtype: "float32" or "bfloat16" storage of the bank and queries
      (similarities are accumulated in float32 either way; "bfloat16" is an
      approximate search).
    devices: devices over which the bank is split (default: all).
    screen: float32 bank only: find candidates with a bfloat16 matmul and
      re-rank them in float32 with a certificate (``_knn_screen``); the
      neighbours are the float32 ones either way. None (default): screen when
      the bank has at least ``SCREEN_MIN_ROWS_PER_CANDIDATE`` rows per device
      per candidate, and stop after the first query chunk if it certified
      less than ``SCREEN_MIN_CERTIFIED`` of its queries.
    screen_candidates: candidates per query for screening (>= max(ks));
      default ``_knn_screen.candidates(max(ks))``.
    progress: show a progress bar (queries/s, process 0) for searches of
      several query chunks.

  Returns:
    ``{k: scores}`` with scores a float32 NumPy array (N_test, C); the
    predicted class is ``scores.argmax(1)``. For "cosine" a score is the sum
    of exp(sim / T) over the neighbours of that class, for "euclidean" the
    sum of 1 / distance (or the count of exact matches).

  Example:
    >>> scores = classify(xtr, ytr, xte, 10, ks=(20,))
    >>> accuracy = (scores[20].argmax(1) == yte).mean()
  """
  xtr, ytr, xte = _check_inputs(train_features, train_labels, test_features,
                                num_classes, ks, metric, temperature,
                                query_chunk, bank_shard, bank_dtype)
  xtr, xte = preprocess(xtr, xte, metric=metric, zscore=zscore)
  n_train = len(xtr)
  k_max = min(max(ks), n_train)
  keys, idx = _neighbour_search(xtr, xte, k_max, metric, query_chunk,
                                bank_shard, bank_dtype, devices, screen,
                                screen_candidates, progress)
  ks_eff = tuple(min(k, n_train) for k in ks)
  vote = _vote(ks_eff, metric, float(temperature), num_classes)
  chunk = _chunk_size(query_chunk, "cosine", k_max, 1, len(xte))
  outputs = {k: [] for k in ks}
  for n, scores_per_k in _ahead(
      (n, vote(jnp.asarray(key), jnp.asarray(ytr[i])))
      for n, (key, i) in _padded_chunks(chunk, keys, idx)):
    for k, scores in zip(ks, scores_per_k):
      outputs[k].append(np.asarray(scores)[:n])
  return {k: (np.concatenate(v) if v else np.zeros((0, num_classes), np.float32))
          for k, v in outputs.items()}


def neighbours(train_features: np.ndarray,
               test_features: np.ndarray,
               k: int,
               metric: str = "cosine",
               zscore: bool = False,
               **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """The ``k`` nearest training examples of every test example.

  Args:
    train_features: (N_train, D).
    test_features: (N_test, D).
    k: number of neighbours (clipped to N_train).
    metric: "cosine" or "euclidean" (see ``classify``).
    zscore: standardise with training statistics first.
    **kwargs: ``query_chunk``, ``bank_shard``, ``bank_dtype``, ``devices``,
      ``screen``, ``screen_candidates``, ``progress`` (see ``classify``).

  Returns:
    ``(values, indices)``, each (N_test, min(k, N_train)), nearest first:
    cosine similarities (descending) or Euclidean distances (ascending), and
    training indices (ties: lower index first).
  """
  labels = np.zeros((len(train_features),), np.int64)
  options = dict(query_chunk=1024, bank_shard=None, bank_dtype="float32",
                 devices=None, screen=None, screen_candidates=None,
                 progress=True)
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise ValueError(f"unknown arguments {unknown}")
  options.update(kwargs)
  xtr, _, xte = _check_inputs(train_features, labels, test_features, 1, (k,),
                              metric, 1.0, options["query_chunk"],
                              options["bank_shard"], options["bank_dtype"])
  xtr, xte = preprocess(xtr, xte, metric=metric, zscore=zscore)
  keys, idx = _neighbour_search(xtr, xte, min(k, len(xtr)), metric, **options)
  return (-keys if metric == "cosine" else keys), idx


def preprocess(train: np.ndarray, test: np.ndarray, *, metric: str,
               zscore: bool) -> tuple[np.ndarray, np.ndarray]:
  """Optional z-scoring with train statistics, then L2 norm for cosine.

  Args:
    train: (N_train, D) float32.
    test: (N_test, D) float32.
    metric: "cosine" normalises rows to unit L2 norm (as DINO's
      ``nn.functional.normalize``, eps 1e-12); "euclidean" leaves them.
    zscore: subtract the training mean and divide by the training std
      (population std, 0 replaced by 1, as scikit-learn's StandardScaler).

  Returns:
    The transformed (train, test), float32.
  """
  train = np.asarray(train, np.float32)
  test = np.asarray(test, np.float32)
  if zscore:
    mean = train.mean(0, dtype=np.float64)
    std = train.std(0, dtype=np.float64)
    std[std == 0] = 1.0
    train = ((train - mean) / std).astype(np.float32)
    test = ((test - mean) / std).astype(np.float32)
  if metric == "cosine":
    train, test = _l2_normalise(train), _l2_normalise(test)
  return train, test


def _l2_normalise(x: np.ndarray) -> np.ndarray:
  # einsum avoids the (N, D) temporary of ``linalg.norm`` (3x faster on a
  # 100k x 2048 bank); float32 accumulation as in torch's normalize.
  norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
  return x / np.maximum(norms, np.float32(1e-12))


def _check_inputs(train_features, train_labels, test_features, num_classes, ks,
                  metric, temperature, query_chunk, bank_shard, bank_dtype):
  xtr = np.asarray(train_features, np.float32)
  xte = np.asarray(test_features, np.float32)
  ytr = np.asarray(train_labels)
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
    raise ValueError("train_features and test_features must be (N, D) with the "
                     f"same D, got {xtr.shape} and {xte.shape}")
  if len(xtr) == 0:
    raise ValueError("train_features is empty")
  if ytr.shape != (len(xtr),) or not np.issubdtype(ytr.dtype, np.integer):
    raise ValueError(f"train_labels must be ({len(xtr)},) integers, got "
                     f"{ytr.shape} {ytr.dtype}")
  if ytr.min() < 0 or ytr.max() >= num_classes:
    raise ValueError(f"train_labels must lie in [0, {num_classes}), got "
                     f"[{ytr.min()}, {ytr.max()}]")
  if not ks or any(int(k) != k or k < 1 for k in ks):
    raise ValueError(f"ks must be positive integers, got {ks}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if query_chunk < 1 or (bank_shard is not None and bank_shard < 1):
    raise ValueError(f"query_chunk and bank_shard must be >= 1, got "
                     f"{query_chunk}, {bank_shard}")
  if bank_dtype not in BANK_DTYPES:
    raise ValueError(f"bank_dtype must be float32 or bfloat16, got {bank_dtype!r}")
  _selection.check_finite("train_features", xtr)
  _selection.check_finite("test_features", xte)
  return xtr, ytr.astype(np.int32), xte


def _place_bank(xtr, bank_shard, bank_dtype, devices, chunk):
  """Pads the bank and splits it row-wise over the devices.

  Device d holds rows [d*R, (d+1)*R), searched in shards of S rows (S from
  ``bank_shard`` or, if None, the largest a (chunk, S) float32 block within
  ``SIMILARITY_BUDGET_BYTES`` allows, balanced so that padding is minimal);
  padding rows (index >= N_train) are masked out of every search.
  """
  devices = tuple(jax.devices() if devices is None else devices)
  n_train, dim = xtr.shape
  rows = -(-n_train // len(devices))
  if bank_shard is None:
    bank_shard = max(1, SIMILARITY_BUDGET_BYTES // (4 * chunk))
  n_shards = -(-rows // min(bank_shard, rows))
  shard = -(-rows // n_shards)
  rows = n_shards * shard
  if len(devices) * rows > n_train:
    xtr = np.concatenate([xtr, np.zeros((len(devices) * rows - n_train, dim),
                                        np.float32)])
  mesh = parallel.make_mesh(devices=devices)
  # One host-to-device copy (no intermediate jnp array); bfloat16 is cast on
  # the devices.
  bank = jax.device_put(xtr, NamedSharding(mesh, P(parallel.DATA_AXIS)))
  if bank_dtype != "float32":
    bank = bank.astype(jnp.dtype(bank_dtype))
  return mesh, bank, rows, shard


def _chunk_size(query_chunk, metric, k, dim, n_queries):
  """Queries per step: at most ``query_chunk`` (for "euclidean", whose exact
  re-ranking gathers a (chunk, k, D) float32 block of candidates, also at most
  ~64 MB of it), balanced over the steps so the padded last chunk wastes
  little work (2,000 queries -> 2 x 1,000 rather than 1,024 + 976 + padding)."""
  if metric == "euclidean":
    query_chunk = max(1, min(query_chunk, (64 << 20) // (4 * k * dim)))
  n_queries = max(n_queries, 1)
  steps = -(-n_queries // query_chunk)
  return -(-n_queries // steps)


def _padded_chunks(chunk, *arrays):
  """Yields (n_valid, blocks): ``chunk`` rows of every array, the last block
  zero-padded to full size so that every step has one shape (one
  compilation); the caller drops the padded rows."""
  for start in range(0, len(arrays[0]), chunk):
    blocks = [a[start:start + chunk] for a in arrays]
    n = len(blocks[0])
    if n < chunk:
      blocks = [np.concatenate([b, np.zeros((chunk - n,) + b.shape[1:], b.dtype)])
                for b in blocks]
    yield n, blocks


def _ahead(results, depth=2):
  """Yields ``results`` while keeping ``depth`` more chunks dispatched, so the
  device computes the next chunks while the host reads this one back (JAX
  dispatch is asynchronous), with bounded device memory."""
  pending = collections.deque()
  for r in results:
    pending.append(r)
    if len(pending) > depth:
      yield pending.popleft()
  yield from pending


def _local_top_k(bank, queries, *, rows, shard, k, metric, n_train):
  """Top-k of one device's bank block (``_shard_top_k.block_top_k``: one
  matmul and one ``lax.top_k`` per shard, ties to the lower training index).

  Returns (keys, indices): keys ascending (-similarity or distance), ties by
  lower global index; indices global.
  """
  offset = jax.lax.axis_index(parallel.DATA_AXIS) * rows
  n_shards = rows // shard
  blocks = bank.reshape(n_shards, shard, bank.shape[-1])
  # float32 banks are searched exactly (accelerators would otherwise use
  # bfloat16 passes); a bfloat16 bank has already chosen speed over exactness.
  precision = (jax.lax.Precision.HIGHEST if bank.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)

  def score(block, s):
    dots = jnp.einsum("qd,sd->qs", queries, block, precision=precision,
                      preferred_element_type=jnp.float32)
    if metric == "euclidean":
      # -|q - y|^2 up to the per-query constant |q|^2 (same ranking).
      sq = jnp.sum(jnp.square(block.astype(jnp.float32)), axis=1)
      dots = 2.0 * dots - sq[None, :]
    local = s * shard + jnp.arange(shard, dtype=jnp.int32)
    return jnp.where((offset + local < n_train)[None, :], dots, -jnp.inf)

  best_v, local, _ = _shard_top_k.block_top_k(score, blocks, n_shards, shard, k)
  best_i = offset + local

  if metric == "cosine":
    keys = -best_v
  else:
    # Exact distances of the few candidates: |q - y| computed directly, so that
    # exact duplicates give 0 (the expanded form above does not) and ties are
    # resolved on exact values.
    cand = bank[local].astype(jnp.float32)                  # (q, k, D)
    diff = queries.astype(jnp.float32)[:, None, :] - cand
    keys = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    keys = jnp.where(best_i < n_train, keys, jnp.inf)
  keys, best_i = jax.lax.sort((keys, best_i), dimension=1, num_keys=2)
  return keys, best_i


@functools.lru_cache(maxsize=32)
def _search(mesh, n_train, rows, shard, k_max, metric):
  """Jitted (bank, queries) -> global (keys, indices), cached per shape."""
  k_local = min(k_max, rows)

  def per_device(bank, queries):
    keys, idx = _local_top_k(bank, queries, rows=rows, shard=shard, k=k_local,
                             metric=metric, n_train=n_train)
    return _shard_top_k.gather_top_k(keys, idx, k_max)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(parallel.DATA_AXIS), P()),
                               out_specs=(P(), P()), check_vma=False))


@functools.lru_cache(maxsize=32)
def _vote(ks, metric, temperature, num_classes):
  """Jitted (keys, neighbour labels) -> one (q, C) score array per k."""

  @jax.jit
  def fn(keys, neighbour_labels):
    if metric == "cosine":
      weights = jnp.exp(-keys / temperature)                # keys = -sim
    else:
      weights = 1.0 / keys                                  # inf at distance 0
    out = []
    row = jnp.arange(keys.shape[0])[:, None]
    for k in ks:
      w = weights[:, :k]
      if metric == "euclidean":
        exact = jnp.isinf(w)
        w = jnp.where(jnp.any(exact, axis=1, keepdims=True),
                      exact.astype(jnp.float32), w)
      scores = jnp.zeros((keys.shape[0], num_classes), jnp.float32)
      out.append(scores.at[row, neighbour_labels[:, :k]].add(w))
    return tuple(out)

  return fn


def _neighbour_search(xtr, xte, k, metric, *args, **kwargs):
  """Global top-k of every query: (keys, indices) NumPy arrays (N_test, k).

  keys ascending (-similarity or distance), ties by lower training index.
  Arguments after ``metric``: see ``_search_all``.
  """
  start = time.perf_counter()
  out = _search_all(xtr, xte, k, metric, *args, **kwargs)
  seconds = time.perf_counter() - start
  logging.info("kNN (%s, k=%d): %d queries x %d training rows in %.2f s "
               "(%.0f queries/s)", metric, k, len(xte), len(xtr), seconds,
               len(xte) / max(seconds, 1e-9))
  return out


def _search_all(xtr, xte, k, metric, query_chunk, bank_shard, bank_dtype,
                devices, screen, screen_candidates, progress):
  """``_neighbour_search`` without the timing log."""
  n_train, dim = xtr.shape
  if len(xte) == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  if screen_candidates is not None and screen_candidates < k:
    raise ValueError(f"screen_candidates={screen_candidates} must be >= k={k}")
  if screen and bank_dtype != "float32":
    raise ValueError("screen=True needs bank_dtype='float32' (a bfloat16 bank "
                     "is already an approximate search)")
  if bank_shard is None:
    # A block needs at least one bank row: the query chunk alone must fit.
    query_chunk = min(query_chunk, max(1, SIMILARITY_BUDGET_BYTES // 4))
  n_devices = len(jax.devices() if devices is None else devices)
  rows = -(-n_train // n_devices)
  m = min(screen_candidates or _knn_screen.candidates(k), rows)
  screen_forced = bool(screen)
  if screen is None:
    screen = (bank_dtype == "float32"
              and rows >= SCREEN_MIN_ROWS_PER_CANDIDATE * m)
  exact_query_chunk = query_chunk
  exact_chunk = _chunk_size(query_chunk, metric, k, dim, len(xte))
  if not screen:
    mesh, bank, rows, shard = _place_bank(xtr, bank_shard, bank_dtype, devices,
                                          exact_chunk)
    exact = _search(mesh, n_train, rows, shard, k, metric)
    return _run_chunks(lambda q: exact(bank, q), xte, exact_chunk, bank.dtype,
                       progress=progress)[:2]

  if bank_shard is None:
    # One screening top-k over the whole device block beats several shard
    # top-k's plus a merge: shrink the query chunk until a (chunk, rows)
    # float32 block fits the budget (the matmul stays efficient at >= 128).
    query_chunk = min(query_chunk,
                      max(128, SIMILARITY_BUDGET_BYTES // (4 * rows)))
  # (the screen re-ranks one query at a time: no (chunk, k, D) block to cap)
  chunk = _chunk_size(query_chunk, "cosine", k, dim, len(xte))
  mesh, bank, rows, shard = _place_bank(xtr, bank_shard, bank_dtype, devices,
                                        chunk)
  m = min(m, rows)
  exact = _search(mesh, n_train, rows, shard, k, metric)
  stats = _knn_screen.bank_stats(mesh)(bank)
  sqnorms = _knn_screen.bank_sqnorms(mesh)(bank)
  bank16 = bank.astype(jnp.bfloat16)
  fn = _knn_screen.screened_search(mesh, n_train, rows, shard, m, k, dim, metric)
  screened = lambda q: fn(bank, bank16, stats, sqnorms, q)
  # The first chunk tells whether screening pays on this data: when most
  # similarities crowd within the bfloat16 error of the k-th (e.g. queries far
  # from every training example), few queries are certified and the float32
  # search would be paid twice; then (unless screen=True) it alone is used.
  n = len(xte)
  keys = np.zeros((n, k), np.float32)
  idx = np.zeros((n, k), np.int32)
  certified = np.zeros((n,), bool)
  first = min(chunk, n)
  keys[:first], idx[:first], certified[:first] = _run_chunks(
      screened, xte[:first], chunk, bank.dtype, progress=progress)
  if screen_forced or certified[:first].mean() >= SCREEN_MIN_CERTIFIED:
    if first < n:
      keys[first:], idx[first:], certified[first:] = _run_chunks(
          screened, xte[first:], chunk, bank.dtype, desc="kNN screened search",
          progress=progress)
  else:
    logging.info("kNN: screening certified only %d of the first %d queries; "
                 "using the float32 search", certified.sum(), first)
  del bank16
  redo = np.flatnonzero(~certified)
  logging.info("kNN: bfloat16 screening with %d candidates certified %d of %d "
               "queries; %d computed with the float32 search", m,
               n - len(redo), n, len(redo))
  if len(redo):
    # The bank was split for the screen's (smaller) query chunk, often into
    # one shard per device: the float32 search over it must use a query chunk
    # that keeps (chunk, shard) within the budget too, whatever --query_chunk.
    fallback_chunk = _chunk_size(
        exact_query_chunk if bank_shard is not None else
        min(exact_query_chunk, max(1, SIMILARITY_BUDGET_BYTES // (4 * shard))),
        metric, k, dim, len(redo))
    keys[redo], idx[redo] = _run_chunks(lambda q: exact(bank, q), xte[redo],
                                        fallback_chunk, bank.dtype,
                                        desc="kNN float32 search",
                                        progress=progress)
  return keys, idx


def _run_chunks(fn, queries, chunk, dtype, desc="kNN search", progress=True):
  """Runs ``fn`` on every query chunk (pipelined) and concatenates its outputs
  (each (chunk, ...)), dropping the padding rows. Searches of several chunks
  show a progress bar (queries/s) on process 0."""
  parts = []
  with tqdm.tqdm(total=len(queries), unit="query", unit_scale=True,
                 smoothing=0.1, desc=desc, leave=False,
                 disable=(not progress or not parallel.is_writer()
                          or len(queries) <= chunk)) as bar:
    for n, out in _ahead((n, fn(jnp.asarray(q, dtype)))
                         for n, (q,) in _padded_chunks(chunk, queries)):
      parts.append([np.asarray(o)[:n] for o in out])
      bar.update(n)
  if not parts:
    raise AssertionError("no queries")
  return [np.concatenate(p) for p in zip(*parts)]


def run(train: FeatureInputs, test: FeatureInputs, options: Options = Options(), *,
        mesh: jax.sharding.Mesh | None = None, context: RunContext = RunContext()
        ) -> ProtocolResult:
  """The kNN protocol: every k of ``options.knn_k`` from one search, no selection.

  Rows per distinct k used (a k above the training set size uses all of it:
  the row records the k used, ``k_requested`` and a warning), with the test
  set's metrics (top-5: a class without votes never counts).
  """
  p = _rows.prepare(train, test, context, "knn")
  o = options
  scores = classify(p.xtr, p.ytr, p.xte, p.num_classes, ks=o.knn_k,
                    metric=o.knn_metric, temperature=o.knn_temperature,
                    zscore=o.zscore, bank_dtype=o.bank_dtype,
                    query_chunk=o.query_chunk, devices=_rows.devices(mesh),
                    progress=bool(context.progress))
  n_train = len(p.xtr)
  # k > N_train uses every training example: the row stores the k used,
  # once per distinct k (several requested k can clip to the same one).
  used: dict[int, list[int]] = {}
  for k in o.knn_k:
    used.setdefault(min(k, n_train), []).append(k)
  results = {}
  for k_used, requested in used.items():
    k = requested[0]
    hp = dict(k=k_used, metric=o.knn_metric, zscore=bool(o.zscore),
              bank_dtype=o.bank_dtype)
    if requested != [k_used]:
      msg = (f"--knn_k {', '.join(map(str, requested))} > the {n_train} training "
             f"examples: used k={k_used}")
      logging.warning("%s (%s)", msg, train.where)
      hp.update(k_requested=requested, warnings=[msg])
    if o.knn_metric == "cosine":
      hp["temperature"] = o.knn_temperature
    # kNN's top-5 never counts a class that got no vote.
    results[f"k={k_used}"] = p.rows.add_metrics("knn", hp, scores[k],
                                                 positive_only_top5=True)
  return ProtocolResult(p.rows.rows, results, None)


def fit_scores(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, num_classes: int,
               options: Options, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None
               ) -> np.ndarray:
  """(N_test, C) kNN scores with the first k of ``options`` (few-shot's probe)."""
  del seed  # kNN is deterministic
  o = options
  k = o.knn_k[0]
  return classify(x, y, x_test, num_classes, ks=(k,), metric=o.knn_metric,
                  temperature=o.knn_temperature, zscore=o.zscore,
                  bank_dtype=o.bank_dtype, query_chunk=o.query_chunk,
                  devices=_rows.devices(mesh), progress=False)[k]


PROTOCOL = Protocol(
    name="knn", consumes="features", options=Options, run=run,
    reference="DINO (Caron et al. 2021) eval_knn.py; Closer Look (Euclidean, k=20)",
    fit_scores=fit_scores)
