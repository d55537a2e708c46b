"""L2-regularised multinomial logistic regression over a grid of C (a warm-started path).

The objective is scikit-learn's ``LogisticRegression(penalty="l2", C=C)``
(lbfgs, multinomial): ``C * sum_i CE(W x_i + b, y_i) + 0.5 ||W||^2`` with the
intercept ``b`` not penalised and one weight vector per class (the penalty
makes the over-parameterised softmax unique). We minimise the same objective
divided by ``C * N`` (``mean CE + ||W||^2 / (2 C N)``, same minimiser, better
scaled in float32) with L-BFGS (``optax.lbfgs`` with its zoom line search).
The grid is solved as a regularisation path: C in increasing order, each solve
starting from the previous solution (from zero for the smallest C). Solving all
C at once under ``vmap`` instead runs every C until the slowest converges and
was 13x slower on real features (13 C values, 1437 x 1280 digits features:
91 s vs 6.7 s). The data term is summed over chunks of examples with
rematerialisation, so memory stays bounded by (chunk, num_classes) activations
however large N is.

Selection (``fit_select``, ``_selection.select_and_refit``; ``run`` is the
protocol entry point): every C is fitted on a
stratified, seeded 90% of train and ranked on the held-out 10%; the best C
(first in grid order on ties) is refitted on all of train and evaluated on
test once.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from sslbench_jax import parallel
from sslbench_jax.probes import _rows
from sslbench_jax.probes._selection import (GridResult, check_finite,
                                            holdout_option, select_and_refit,
                                            select_on_test_option)
from sslbench_jax.protocols.base import (POSITIVE, FeatureInputs,
                                         Protocol, ProtocolResult, RunContext,
                                         check_options, option)

DEFAULT_CS = tuple(np.logspace(-6, 5, 45).tolist())


@dataclasses.dataclass(frozen=True)
class Options:
  """The logistic-regression protocol's options; defaults: scikit-learn's
  ``LogisticRegression`` (lbfgs, ``max_iter``, gtol 1e-4) over the C grid
  ``logspace(-6, 5, 45)``, selected on 10% of train held out."""
  c: tuple[float, ...] = option(DEFAULT_CS, "logreg: C grid", check=POSITIVE,
                                default_text="45 values logspace(-6, 5)")
  max_iter: int = option(1000, "logreg: L-BFGS iterations at most", check=POSITIVE)
  holdout: float = holdout_option()
  select_on_test: bool = select_on_test_option()

  def __post_init__(self):
    check_options(self)


def fit(features: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        cs: Sequence[float] = DEFAULT_CS,
        max_iter: int = 1000,
        tol: float = 1e-4,
        chunk: int = 65536,
        progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Fits one multinomial logistic regression per C.

  Args:
    features: (N, D).
    labels: (N,) integers in [0, num_classes).
    num_classes: K.
    cs: inverse regularisation strengths (scikit-learn's C).
    max_iter: L-BFGS iterations at most.
    tol: stop when the max-abs gradient of the scaled objective is below it
      (scikit-learn's lbfgs ``gtol``, same default and same scaling).
    chunk: examples per chunk of the data term (bounds memory).
    progress: show a tqdm bar over the C values on process 0.

  Returns:
    (W (num_C, D, K), b (num_C, K)) float32 NumPy arrays.
  """
  x, y = _check(features, labels, num_classes)
  return _fit(x, y, np.ones(len(x), bool), num_classes, cs, max_iter, tol, chunk,
              progress)


def _fit(x, y, mask, num_classes, cs, max_iter=1000, tol=1e-4, chunk=65536,
         progress=True):
  """``fit`` on the rows where ``mask`` is True. Masking (rather than slicing)
  keeps one array shape for the selection fit and the final refit, so the
  solver compiles once."""
  cs = np.asarray(cs, np.float32)
  if cs.ndim != 1 or len(cs) == 0 or not np.all(cs > 0):
    raise ValueError(f"cs must be a non-empty list of positive numbers, got {cs}")
  n, d = x.shape
  chunk = min(chunk, n)
  n_pad = -(-n // chunk) * chunk
  xp = np.zeros((n_pad, d), np.float32)
  xp[:n] = x
  yp = np.zeros((n_pad,), np.int32)
  yp[:n] = y
  mp = np.zeros((n_pad,), bool)
  mp[:n] = mask
  solve = _solver(n_pad // chunk, chunk, d, num_classes, max_iter, float(tol))
  xp, yp, mp = jnp.asarray(xp), jnp.asarray(yp), jnp.asarray(mp)
  ws = np.zeros((len(cs), d, num_classes), np.float32)
  bs = np.zeros((len(cs), num_classes), np.float32)
  w, b = jnp.zeros((d, num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32)
  t0 = time.time()
  # Every solve ends in a host read (the path is warm-started anyway), so the
  # bar's per-C update adds no synchronisation.
  with tqdm.tqdm(np.argsort(cs, kind="stable"), unit="C", smoothing=0.1,
                 desc="logreg C",
                 disable=not progress or not parallel.is_writer()) as bar:
    for i in bar:  # strongest regularisation first
      w, b = solve(xp, yp, mp, jnp.float32(cs[i]), w, b)
      ws[i], bs[i] = np.asarray(w), np.asarray(b)
      bar.set_postfix(C=f"{cs[i]:.3g}", refresh=False)
  seconds = time.time() - t0
  logging.info("logreg: %d C values on %d examples x %d dims in %.1fs "
               "(%.2f C/s)", len(cs), int(mask.sum()), d, seconds,
               len(cs) / max(seconds, 1e-9))
  return ws, bs


def objective(w: np.ndarray, b: np.ndarray, features: np.ndarray,
              labels: np.ndarray, c: float) -> float:
  """scikit-learn's unscaled objective C * sum CE + 0.5 ||W||^2 (float64)."""
  logits = np.asarray(features, np.float64) @ w + b
  logits -= logits.max(1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  ce = -logp[np.arange(len(labels)), labels].sum()
  return float(c * ce + 0.5 * np.sum(np.asarray(w, np.float64) ** 2))


def fit_select(train_features: np.ndarray,
               train_labels: np.ndarray,
               test_features: np.ndarray,
               test_labels: np.ndarray | None,
               num_classes: int,
               cs: Sequence[float] = DEFAULT_CS,
               holdout: float = Options.holdout,
               seed: int = 0,
               select_on_test: bool = False,
               progress: bool = True,
               **fit_kwargs) -> GridResult:
  """Selects C on held-out train, refits on all train, evaluates on test once.

  Args:
    train_features: (N_train, D).
    train_labels: (N_train,).
    test_features: (N_test, D).
    test_labels: (N_test,) class indices, or None when the test set is scored
      elsewhere from ``test_scores`` (e.g. multi-label ReaL); then
      ``test_top1`` / ``test_top5`` are NaN.
    num_classes: K.
    cs: the C grid.
    holdout: fraction of every class held out for selection.
    seed: seeds the held-out split.
    select_on_test: "max over test" mode (fit on all train, report the best
      test accuracy over C; not a fair protocol; needs ``test_labels``).
    progress: show a bar over the C values of each fit (see ``fit``).
    **fit_kwargs: ``max_iter``, ``tol``, ``chunk`` for ``fit``.

  Returns:
    A ``GridResult`` over ``cs``.
  """
  cs = [float(c) for c in cs]
  x, y = _check(train_features, train_labels, num_classes)
  xte = np.asarray(test_features, np.float32)
  check_finite("test_features", xte)

  def fit_grid(rows, grid):
    # A mask (not a slice) keeps one array shape for the selection fit and
    # the refit, so the solver compiles once.
    mask = np.ones(len(y), bool)
    if rows is not None:
      mask[:] = False
      mask[rows] = True
    w, b = _fit(x, y, mask, num_classes, [cs[i] for i in grid],
                progress=progress, **fit_kwargs)
    where = {g: j for j, g in enumerate(grid)}
    return lambda i, feats: feats @ w[where[i]] + b[where[i]]

  return select_and_refit(fit_grid, cs, x, y, xte, test_labels, holdout,
                          seed, select_on_test, "logreg", label="C")


def _check(features, labels, num_classes):
  x = np.asarray(features, np.float32)
  y = np.asarray(labels)
  if x.ndim != 2 or len(x) == 0:
    raise ValueError(f"features must be a non-empty (N, D) array, got {x.shape}")
  if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be ({len(x)},) integers, got {y.shape} {y.dtype}")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes})")
  check_finite("train_features", x)
  return x, y.astype(np.int32)


@functools.lru_cache(maxsize=16)
def _solver(n_chunks, chunk, d, k, max_iter, tol):
  """Jitted (x, y, mask, c, w0, b0) -> (W, b) from (w0, b0) (cached per shape)."""

  def data_term(params, x, y, mask):
    """mean CE over the masked rows, chunk by chunk, recomputed in backward."""
    xs = x.reshape(n_chunks, chunk, d)
    ys = y.reshape(n_chunks, chunk)
    valid = mask.reshape(n_chunks, chunk)

    @jax.checkpoint
    def body(total, inputs):
      xc, yc, vc = inputs
      logits = xc @ params["w"] + params["b"]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, yc)
      return total + jnp.sum(jnp.where(vc, ce, 0.0)), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (xs, ys, valid))
    return total

  def solve_one(x, y, mask, c, w0, b0):
    n = jnp.sum(mask.astype(jnp.float32))

    def f(params):
      return (data_term(params, x, y, mask)
              + 0.5 * jnp.sum(jnp.square(params["w"])) / c) / n

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(f)
    params = {"w": w0, "b": b0}

    def cond(carry):
      _, state = carry
      it = optax.tree.get(state, "count")
      grad = optax.tree.get(state, "grad")
      gmax = optax.tree.max(jax.tree.map(jnp.abs, grad))
      return (it == 0) | ((it < max_iter) & (gmax > tol))

    def body(carry):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                  value_fn=f)
      return optax.apply_updates(params, updates), state

    params, _ = jax.lax.while_loop(cond, body, (params, opt.init(params)))
    return params["w"], params["b"]

  return jax.jit(solve_one)


def run(train: FeatureInputs, test: FeatureInputs, options: Options = Options(), *,
        mesh: jax.sharding.Mesh | None = None, context: RunContext = RunContext()
        ) -> ProtocolResult:
  """The logistic-regression protocol: the C grid selected on held-out train
  (or "max over test"), refitted on all of train, scored on test once."""
  del mesh  # one device: every process computes the same
  p = _rows.prepare(train, test, context, "logreg")
  o = options
  cs = list(o.c)
  r = fit_select(p.xtr, p.ytr, p.xte, p.yte, p.num_classes, cs, holdout=o.holdout,
                 seed=int(context.seed), select_on_test=o.select_on_test,
                 max_iter=o.max_iter, progress=bool(context.progress))
  hp = dict(C=r.selected, grid_size=len(cs), selection=r.selection,
            holdout=o.holdout, max_iter=o.max_iter)
  p.rows.add_metrics("logreg", hp, r.test_scores)
  metric = "test_top1" if r.selection == "max over test" else "holdout_top1"
  scores = {_rows.label({"C": c}): {metric: v} for c, v in zip(cs, r.holdout_top1)}
  return ProtocolResult(p.rows.rows, scores, _rows.label({"C": r.selected}))


PROTOCOL = Protocol(
    name="logreg", consumes="features", options=Options, run=run,
    reference="scikit-learn LogisticRegression(penalty='l2', lbfgs, multinomial); "
    "C grid over logspace(-6, 5)")
