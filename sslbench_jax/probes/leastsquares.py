"""Closed-form regularised least-squares classifier (big_vision's few-shot probe).

As big_vision's ``evaluators/fewshot`` does: features are standardised with
the training mean and std (+1e-5), a constant column of value 100 is appended
(a bias that the ridge penalty barely touches), targets are one-hot in
{-1, +1}, and ``W = (X^T X + l2 I)^-1 X^T Y``. One symmetric
eigendecomposition ``Q diag(e) Q^T`` of ``X^T X`` (N >= D) or ``X X^T``
(D > N) is shared by every l2: ``W = L diag(1 / (e + l2)) R`` with
L, R precomputed, so a whole grid of l2 values costs one decomposition.

Precision: with the bias column of 100 the Gram matrix has a condition number
of ~1e4 * N before regularisation, so in float32 small l2 values lose 2-3
digits (big_vision runs it in float32). We compute in float64 by default
(``dtype="float32"`` for accelerators without float64, or big_vision parity).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslbench_jax.probes import _rows
from sslbench_jax.probes._selection import (GridResult, check_finite,
                                            holdout_option, select_and_refit,
                                            select_on_test_option)
from sslbench_jax.protocols.base import (NON_NEGATIVE, FeatureInputs,
                                         Protocol, ProtocolResult, RunContext,
                                         check_options, option)

BIAS_CONSTANT = 100.0
DEFAULT_L2 = tuple(float(2.0 ** i) for i in range(-10, 20))


@dataclasses.dataclass
class Cache:
  """The l2-independent part of the solution (see module docstring)."""
  dtype: str
  eigs: jax.Array   # (M,)
  lhs: jax.Array    # (D + 1, M)
  rhs: jax.Array    # (M, C)
  mean: jax.Array   # (D,)
  std: jax.Array    # (D,)


@dataclasses.dataclass(frozen=True)
class Options:
  """The closed-form least-squares protocol's options; defaults: big_vision's
  few-shot probe (``evaluators/fewshot``), its l2 grid 2^-10 .. 2^19 selected
  on 10% of train held out."""
  l2: tuple[float, ...] = option(DEFAULT_L2, "leastsquares: l2 grid",
                                 check=NON_NEGATIVE, default_text="2^-10..2^19")
  holdout: float = holdout_option()
  select_on_test: bool = select_on_test_option()

  def __post_init__(self):
    check_options(self)


def precompute(features: np.ndarray, labels: np.ndarray,
               num_classes: int, dtype: str = "float64") -> Cache:
  """Standardises, appends the bias column and eigendecomposes once.

  Args:
    features: (N, D) training features.
    labels: (N,) integers in [0, num_classes).
    num_classes: C.
    dtype: "float64" (default) or "float32" arithmetic.

  Returns:
    A ``Cache`` for ``weights`` / ``predict``.
  """
  x = np.asarray(features, np.float32)
  y = np.asarray(labels)
  if x.ndim != 2 or len(x) == 0 or y.shape != (len(x),):
    raise ValueError(f"need features (N, D) and labels (N,), got {x.shape}, {y.shape}")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes})")
  if dtype not in ("float32", "float64"):
    raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
  with jax.enable_x64(dtype == "float64"):
    parts = _precompute(jnp.asarray(x, dtype), jnp.asarray(y, jnp.int32),
                        num_classes)
  return Cache(dtype, *parts)


def weights(cache: Cache, l2: float) -> jax.Array:
  """(D + 1, C) solution for one l2 (last row multiplies the bias column)."""
  with jax.enable_x64(cache.dtype == "float64"):
    return _weights(cache.eigs, cache.lhs, cache.rhs,
                    jnp.asarray(l2, cache.dtype))


def predict(cache: Cache, features: np.ndarray, l2: float) -> np.ndarray:
  """(N, C) scores of ``features`` for the solution at ``l2``."""
  with jax.enable_x64(cache.dtype == "float64"):
    x = _augment(jnp.asarray(features, cache.dtype), cache.mean, cache.std)
    return np.asarray(x @ weights(cache, l2))


def fit_select(train_features: np.ndarray,
               train_labels: np.ndarray,
               test_features: np.ndarray,
               test_labels: np.ndarray | None,
               num_classes: int,
               l2s: Sequence[float] = DEFAULT_L2,
               holdout: float = Options.holdout,
               seed: int = 0,
               select_on_test: bool = False,
               dtype: str = "float64") -> GridResult:
  """Selects l2 on held-out train, refits on all train, evaluates on test once.

  Args:
    train_features: (N_train, D).
    train_labels: (N_train,).
    test_features: (N_test, D).
    test_labels: (N_test,) class indices, or None when the test set is scored
      elsewhere from ``test_scores``; then ``test_top1`` / ``test_top5`` are NaN.
    num_classes: C.
    l2s: regularisation grid (big_vision: 2^-10 .. 2^19).
    holdout: fraction of every class held out for selection.
    seed: seeds the split.
    select_on_test: "max over test" mode (not a fair protocol; needs
      ``test_labels``).
    dtype: arithmetic of ``precompute``.

  Returns:
    A ``GridResult`` over ``l2s``.
  """
  l2s = [float(v) for v in l2s]
  xtr = np.asarray(train_features, np.float32)
  ytr = np.asarray(train_labels)
  xte = np.asarray(test_features, np.float32)
  check_finite("train_features", xtr)
  check_finite("test_features", xte)

  def fit_grid(rows, grid):
    del grid  # one decomposition serves every l2
    cache = (precompute(xtr, ytr, num_classes, dtype) if rows is None
             else precompute(xtr[rows], ytr[rows], num_classes, dtype))
    return lambda i, x: predict(cache, x, l2s[i])

  return select_and_refit(fit_grid, l2s, xtr, ytr, xte, test_labels, holdout,
                          seed, select_on_test, "least squares", label="l2")


def _augment(x, mean, std):
  x = (x - mean) / std
  return jnp.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


@functools.partial(jax.jit, static_argnums=(2,))
def _precompute(x, y, num_classes):
  mean = jnp.mean(x, axis=0)
  std = jnp.std(x, axis=0) + 1e-5
  x = _augment(x, mean, std)
  targets = 2.0 * jax.nn.one_hot(y, num_classes) - 1.0
  n, d = x.shape
  hi = jax.lax.Precision.HIGHEST
  if n >= d:   # (X^T X + l2 I)^-1 X^T Y
    eigs, q = jnp.linalg.eigh(jnp.matmul(x.T, x, precision=hi))
    rhs = q.T @ (x.T @ targets)
    lhs = q
  else:        # X^T (X X^T + l2 I)^-1 Y
    eigs, q = jnp.linalg.eigh(jnp.matmul(x, x.T, precision=hi))
    rhs = q.T @ targets
    lhs = x.T @ q
  return eigs, lhs, rhs, mean, std


@jax.jit
def _weights(eigs, lhs, rhs, l2):
  return (lhs * (1.0 / (eigs + l2))[None, :]) @ rhs


def run(train: FeatureInputs, test: FeatureInputs, options: Options = Options(), *,
        mesh: jax.sharding.Mesh | None = None, context: RunContext = RunContext()
        ) -> ProtocolResult:
  """The least-squares protocol: the l2 grid selected on held-out train (or
  "max over test"), refitted on all of train, scored on test once."""
  del mesh  # one device: every process computes the same
  p = _rows.prepare(train, test, context, "leastsquares")
  o = options
  l2s = list(o.l2)
  r = fit_select(p.xtr, p.ytr, p.xte, p.yte, p.num_classes, l2s, holdout=o.holdout,
                 seed=int(context.seed), select_on_test=o.select_on_test)
  hp = dict(l2=r.selected, grid_size=len(l2s), selection=r.selection,
            holdout=o.holdout)
  p.rows.add_metrics("leastsquares", hp, r.test_scores)
  metric = "test_top1" if r.selection == "max over test" else "holdout_top1"
  scores = {_rows.label({"l2": v}): {metric: t} for v, t in zip(l2s, r.holdout_top1)}
  return ProtocolResult(p.rows.rows, scores, _rows.label({"l2": r.selected}))


def fit_scores(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, num_classes: int,
               options: Options, *, seed: int = 0,
               mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """(N_test, C) scores of the solution at the first l2 of ``options``
  (few-shot's probe)."""
  del seed, mesh  # closed form, one device
  return predict(precompute(x, y, num_classes), x_test, options.l2[0])


PROTOCOL = Protocol(
    name="leastsquares", consumes="features", options=Options, run=run,
    reference="big_vision evaluators/fewshot (closed-form ridge, l2 2^-10..2^19)",
    fit_scores=fit_scores)
