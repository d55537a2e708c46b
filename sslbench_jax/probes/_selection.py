"""Helpers shared by the probes: held-out splits, top-k counting, grid selection."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

from absl import logging
import numpy as np

from sslbench_jax.metrics import scoring
from sslbench_jax.protocols.base import FRACTION, option


def check_finite(name: str, x: np.ndarray) -> None:
  """Raises ValueError naming ``name`` when rows of ``x`` hold NaN or inf.

  A NaN row would be scored as class 0 (argmax of NaN scores) and a NaN in
  training poisons every fitted weight, so probes refuse them outright.
  """
  x = np.asarray(x)
  if x.size and not np.isfinite(x).all():
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(1)
    raise ValueError(f"{name}: {int(bad.sum())} of {len(x)} rows contain NaN or "
                     f"inf (first at row {int(np.argmax(bad))})")


def topk_hits(logits: np.ndarray, labels: np.ndarray,
              ks: Sequence[int]) -> np.ndarray:
  """Number of examples whose label is in the top-k (``metrics.scoring``'s rule)."""
  return np.array([np.sum(scoring.topk_correct(logits, labels, k)) for k in ks],
                  np.float64)


def stratified_split(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices into (fit, holdout) with ``fraction`` of every class held out.

  Every class with at least 2 examples keeps at least one example on each side
  (``round(fraction * n_c)`` clipped to [1, n_c - 1]); singleton classes stay in
  ``fit``. Seeded; indices are returned sorted.
  """
  if not 0 < fraction < 1:
    raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  held = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if len(idx) < 2:
      continue
    m = int(np.clip(round(fraction * len(idx)), 1, len(idx) - 1))
    held.append(rng.choice(idx, m, replace=False))
  held = np.sort(np.concatenate(held)) if held else np.zeros((0,), np.int64)
  fit = np.setdiff1d(np.arange(len(labels)), held)
  return fit, held


@dataclasses.dataclass
class GridResult:
  """Outcome of a probe's grid search (linear, logreg, leastsquares ``fit_select``).

  Attributes:
    grid: the grid points (a ``linear.HeadConfig``, a C, an l2), grid order.
    holdout_top1: per grid point, top-1 (%) on the held-out slice (on test in
      "max over test" mode; NaN when a single point was not ranked).
    best: index of the selected grid point.
    selection: "holdout" or "max over test".
    test_top1: top-1 (%) on test of the selected model, refitted on all of
      train (NaN without single-label test labels).
    test_top5: top-5 (%).
    n_test: number of test examples.
    test_scores: (N_test, C) scores of that model on test, for the test
      set's own metrics (``metrics/scoring.py``).
  """
  grid: list[Any]
  holdout_top1: list[float]
  best: int
  selection: str
  test_top1: float
  test_top5: float
  n_test: int
  test_scores: np.ndarray | None = dataclasses.field(default=None, repr=False)

  @property
  def selected(self) -> Any:
    """The selected grid point."""
    return self.grid[self.best]


def holdout_option() -> Any:
  """The ``holdout`` option of the protocols that select on held-out train."""
  return option(0.1, "fraction of every training class held out for selection",
                check=FRACTION)


def select_on_test_option() -> Any:
  """The ``select_on_test`` option ("max over test", labelled in the rows)."""
  return option(False, "'max over test' model selection (unfair; only to compare "
                "with papers that did it; ranks by plain top-1, so needs "
                "single-label test labels); results are labelled so")


# A grid fitter: (training rows or None for all, grid indices to fit) ->
# scorer (grid index, features) -> (N, C) scores of that model.
Scorer = Callable[[int, np.ndarray], np.ndarray]
GridFitter = Callable[[Optional[np.ndarray], Sequence[int]], Scorer]


def select_and_refit(fit_grid: GridFitter,
                     grid_values: Sequence[Any],
                     train_features: np.ndarray,
                     train_labels: np.ndarray,
                     test_features: np.ndarray,
                     test_labels: np.ndarray | None = None,
                     holdout: float = 0.1,
                     seed: int = 0,
                     select_on_test: bool = False,
                     name: str = "probe",
                     label: str = "value") -> GridResult:
  """The selection skeleton shared by the closed-form / convex probes.

  "holdout": every grid point is fitted on a stratified, seeded
  ``1 - holdout`` of train and ranked by top-1 on the rest; the best (the
  first on ties) is refitted on all of train and scored on test once.
  "max over test" (``select_on_test``): every grid point is fitted on all of
  train and the best top-1 on test is kept (not a fair protocol; labelled).

  Args:
    fit_grid: ``(rows, grid indices) -> scorer``; ``rows`` None means all of
      train.
    grid_values: the grid points (e.g. the C values), in grid order.
    train_features: (N_train, D).
    train_labels: (N_train,) class indices.
    test_features: (N_test, D).
    test_labels: (N_test,) class indices; only "max over test" needs them.
    holdout: fraction of every class held out.
    seed: seeds the held-out split.
    select_on_test: "max over test" mode.
    name: probe name for errors and the log.
    label: the grid value's name in the log (e.g. "C").

  Returns:
    A ``GridResult`` (test top-1 / top-5 NaN without single-label test labels).
  """
  grid = list(range(len(grid_values)))
  if select_on_test:
    if test_labels is None:
      raise ValueError(f"{name}: select_on_test ranks the grid by top-1 on test "
                       "and needs single-label (N,) test labels")
    score = fit_grid(None, grid)
    top1 = [_top1(score(i, test_features), test_labels) for i in grid]
    best, selection = int(np.argmax(top1)), "max over test"
    test_scores = score(best, test_features)
  else:
    fit, held = stratified_split(train_labels, holdout, seed)
    if len(held) == 0:
      raise ValueError("the held-out slice is empty: every class has < 2 training "
                       "examples; use select_on_test or a single grid value")
    score = fit_grid(fit, grid)
    top1 = [_top1(score(i, train_features[held]), train_labels[held]) for i in grid]
    best, selection = int(np.argmax(top1)), "holdout"
    test_scores = fit_grid(None, [best])(best, test_features)
  logging.info("%s: selected %s=%g (%s top-1 %.2f)", name, label, grid_values[best],
               selection, top1[best])
  test_top1, test_top5 = topk_percent(test_scores, test_labels)
  return GridResult(list(grid_values), top1, best, selection, test_top1, test_top5,
                    len(test_features), test_scores)


def _top1(scores, labels) -> float:
  return float(100.0 * topk_hits(scores, labels, (1,))[0] / max(len(labels), 1))


def topk_percent(scores: np.ndarray,
                 labels: np.ndarray | None) -> tuple[float, float]:
  """(top-1, top-5) in % of ``scores`` against class indices; NaN without labels."""
  if labels is None:
    return math.nan, math.nan
  acc = 100.0 * topk_hits(scores, np.asarray(labels), (1, 5)) / max(len(labels), 1)
  return float(acc[0]), float(acc[1])
