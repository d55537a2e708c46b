"""Statistics across models: ranks, correlations, resampling, fits (NumPy).

Conventions:

* Correlation functions take ``x, y`` of shape (..., n) and reduce the last
  axis, so one call evaluates many bootstrap/permutation resamples at once.
* Bootstrap confidence intervals resample *models* with replacement
  (``n_boot`` resamples, ``numpy.random.default_rng(seed)``) and take the
  percentile interval of the statistic; resamples where it is undefined (a
  constant column) are dropped. Percentile intervals of correlations undercover
  a little for small n (about 26 models here); read them as approximate.
* Permutation p-values are two-sided: the share of ``n_perm`` random
  re-pairings of y with x whose |statistic| is >= the observed one, with the
  +1 correction ``(count + 1) / (n_perm + 1)`` so p is never 0.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

METHODS = ("pearson", "spearman", "kendall")


# ------------------------------------------------------------------ ranks


def average_ranks(a: np.ndarray, descending: bool = False) -> np.ndarray:
  """Ranks along the last axis, ties get their average rank (1-based).

  Same as ``scipy.stats.rankdata(a, axis=-1)`` (``method="average"``); NaNs
  get NaN and are not counted when ranking the others.

  Args:
    a: (..., n) values.
    descending: rank 1 for the largest value (accuracies: 1 = best).

  Returns:
    float64 ranks of the same shape.
  """
  a = np.asarray(a, np.float64)
  if descending:
    a = -a
  valid = ~np.isnan(a)
  x = a[..., :, None]
  y = a[..., None, :]
  vy = valid[..., None, :]
  less = np.sum((y < x) & vy, axis=-1)
  equal = np.sum((y == x) & vy, axis=-1)  # includes itself
  ranks = less + (equal + 1) / 2.0
  return np.where(valid, ranks, np.nan)


# ----------------------------------------------------------- correlations


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Pearson r along the last axis (NaN when a side is constant)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  xc = x - x.mean(axis=-1, keepdims=True)
  yc = y - y.mean(axis=-1, keepdims=True)
  den = np.sqrt(np.sum(xc * xc, axis=-1) * np.sum(yc * yc, axis=-1))
  with np.errstate(invalid="ignore", divide="ignore"):
    r = np.sum(xc * yc, axis=-1) / den
  # Constant inputs give 0/0; tiny round-off can push |r| past 1.
  return np.clip(np.where(den > 0, r, np.nan), -1.0, 1.0)


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Spearman rho: Pearson r of average ranks, along the last axis."""
  return pearson(average_ranks(x), average_ranks(y))


def kendall(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Kendall tau-b (tie-corrected) along the last axis.

  tau_b = (C - D) / sqrt((P - T_x) (P - T_y)) with P = n(n-1)/2 pairs, C/D
  concordant/discordant pairs and T_x/T_y pairs tied in x/y.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  n = x.shape[-1]
  sx = np.sign(x[..., :, None] - x[..., None, :])
  sy = np.sign(y[..., :, None] - y[..., None, :])
  iu = np.triu_indices(n, 1)
  sx = sx[..., iu[0], iu[1]]
  sy = sy[..., iu[0], iu[1]]
  s = np.sum(sx * sy, axis=-1)
  nx = np.sum(sx != 0, axis=-1)  # pairs not tied in x = P - T_x
  ny = np.sum(sy != 0, axis=-1)
  den = np.sqrt(nx.astype(np.float64) * ny)
  with np.errstate(invalid="ignore", divide="ignore"):
    tau = s / den
  return np.clip(np.where(den > 0, tau, np.nan), -1.0, 1.0)


_FUNCS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "pearson": pearson, "spearman": spearman, "kendall": kendall}


@dataclasses.dataclass(frozen=True)
class CorrelationResult:
  """A correlation with its bootstrap interval and permutation p-value."""
  r: float
  ci_low: float
  ci_high: float
  p_value: float
  n: int


def _chunks(total: int, size: int):
  for start in range(0, total, size):
    yield min(size, total - start)


def _bootstrap_interval(stat_fn, arrays, n_boot, confidence, rng, chunk=256):
  n = arrays[0].shape[-1]
  vals = []
  for b in _chunks(n_boot, chunk):
    idx = rng.integers(0, n, size=(b, n))
    vals.append(stat_fn(*[a[..., idx] if a.ndim == 1 else a[idx] for a in arrays]))
  vals = np.concatenate(vals)
  vals = vals[~np.isnan(vals)]
  if not len(vals):
    return float("nan"), float("nan")
  alpha = (1.0 - confidence) / 2.0
  lo, hi = np.percentile(vals, [100 * alpha, 100 * (1 - alpha)])
  return float(lo), float(hi)


def _permutation_p(stat_fn, x, y, observed, n_perm, rng, chunk=256):
  if np.isnan(observed):
    return float("nan")
  n = len(x)
  count = 0
  for b in _chunks(n_perm, chunk):
    perm = np.argsort(rng.random((b, n)), axis=1)
    vals = stat_fn(np.broadcast_to(x, (b, n)), y[perm])
    # Small tolerance so permutations equal to the observed value count.
    count += int(np.sum(np.abs(vals) >= abs(observed) - 1e-12))
  return (count + 1) / (n_perm + 1)


def _finite_pairs(x, y):
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"x and y must be 1-D of equal length, got {x.shape}, {y.shape}")
  keep = np.isfinite(x) & np.isfinite(y)
  return x[keep], y[keep]


def correlate(x: np.ndarray, y: np.ndarray, method: str = "pearson",
              n_boot: int = 2000, n_perm: int = 2000, seed: int = 0,
              confidence: float = 0.95) -> CorrelationResult:
  """Correlation across models with bootstrap CI and permutation p-value.

  Pairs where either value is NaN are dropped first.

  Args:
    x, y: (n,) values per model.
    method: "pearson", "spearman" or "kendall".
    n_boot: bootstrap resamples (0: no interval).
    n_perm: permutations (0: no p-value).
    seed: seeds one ``numpy.random.default_rng`` for both.
    confidence: interval level.

  Returns:
    ``CorrelationResult`` (NaNs where undefined, e.g. n < 3).
  """
  if method not in _FUNCS:
    raise ValueError(f"unknown correlation method {method!r}; valid: {METHODS}")
  fn = _FUNCS[method]
  x, y = _finite_pairs(x, y)
  n = len(x)
  if n < 3:
    return CorrelationResult(*(float("nan"),) * 4, n)
  r = float(fn(x, y))
  rng = np.random.default_rng(seed)
  lo, hi = (_bootstrap_interval(fn, (x, y), n_boot, confidence, rng)
            if n_boot else (float("nan"), float("nan")))
  p = _permutation_p(fn, x, y, r, n_perm, rng) if n_perm else float("nan")
  return CorrelationResult(r, lo, hi, p, n)


def residualize(v: np.ndarray, covariates: np.ndarray) -> np.ndarray:
  """Residuals of least squares of ``v`` on [1, covariates] (last axis = n).

  Args:
    v: (n,) or batched (b, n).
    covariates: (n,) or (n, k) for unbatched ``v``; (b, n, k) for batched.

  Returns:
    Residuals, shape of ``v``.
  """
  v = np.asarray(v, np.float64)
  c = np.asarray(covariates, np.float64)
  if c.ndim == v.ndim:
    c = c[..., None]
  design = np.concatenate([np.ones(c.shape[:-1] + (1,)), c], axis=-1)
  # Pseudo-inverse copes with a constant covariate (one group only).
  beta = np.linalg.pinv(design) @ v[..., None]
  return v - (design @ beta)[..., 0]


def partial_correlation(x: np.ndarray, y: np.ndarray, covariates: np.ndarray,
                        n_boot: int = 2000, n_perm: int = 2000, seed: int = 0,
                        confidence: float = 0.95) -> CorrelationResult:
  """Pearson correlation of x and y after regressing both on ``covariates``.

  E.g. covariates = a ViT indicator: the correlation left within backbone
  families. The bootstrap re-residualises every resample; the permutation
  test permutes the y residuals.

  Args:
    x, y: (n,) values per model.
    covariates: (n,) or (n, k).
    n_boot, n_perm, seed, confidence: as in ``correlate``.

  Returns:
    ``CorrelationResult``.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  c = np.asarray(covariates, np.float64)
  c2 = c[:, None] if c.ndim == 1 else c
  keep = np.isfinite(x) & np.isfinite(y) & np.all(np.isfinite(c2), axis=1)
  x, y, c2 = x[keep], y[keep], c2[keep]
  n = len(x)
  if n < c2.shape[1] + 3:
    return CorrelationResult(*(float("nan"),) * 4, n)

  def stat(xs, ys, cs):
    return pearson(residualize(xs, cs), residualize(ys, cs))

  r = float(stat(x, y, c2))
  rng = np.random.default_rng(seed)
  lo, hi = (float("nan"), float("nan"))
  if n_boot:
    lo, hi = _bootstrap_interval(stat, (x, y, c2), n_boot, confidence, rng)
  p = float("nan")
  if n_perm:
    rx, ry = residualize(x, c2), residualize(y, c2)
    p = _permutation_p(pearson, rx, ry, r, n_perm, rng)
  return CorrelationResult(r, lo, hi, p, n)


# ------------------------------------------------------------------ fits


@dataclasses.dataclass(frozen=True)
class LooFit:
  """Leave-one-out error of a linear fit y ~ a + b x."""
  rmse: float
  mae: float
  predictions: np.ndarray
  n: int


def loo_linear_error(x: np.ndarray, y: np.ndarray) -> LooFit:
  """Leave-one-model-out prediction error of a least-squares line.

  For each model i, fits y = a + b x on the other models and predicts y_i.

  Args:
    x, y: (n,) values per model (NaN pairs dropped).

  Returns:
    ``LooFit`` (RMSE and MAE in the units of y; predictions per kept model).
  """
  x, y = _finite_pairs(x, y)
  n = len(x)
  if n < 3:
    return LooFit(float("nan"), float("nan"), np.full(n, np.nan), n)
  preds = np.empty(n)
  for i in range(n):
    keep = np.arange(n) != i
    b, a = np.polyfit(x[keep], y[keep], 1)
    preds[i] = a + b * x[i]
  err = preds - y
  return LooFit(float(np.sqrt(np.mean(err ** 2))), float(np.mean(np.abs(err))),
                preds, n)


def linear_fit_band(x: np.ndarray, y: np.ndarray, grid: np.ndarray,
                    confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """OLS line and its pointwise confidence band for the mean, on ``grid``.

  Band: yhat +- t_{n-2} * s * sqrt(1/n + (g - mean x)^2 / Sxx).

  Returns:
    (fit, low, high) on ``grid``.
  """
  from scipy import stats as sps  # only here: the t quantile

  x, y = _finite_pairs(x, y)
  n = len(x)
  b, a = np.polyfit(x, y, 1)
  fit = a + b * grid
  resid = y - (a + b * x)
  s = np.sqrt(np.sum(resid ** 2) / max(n - 2, 1))
  sxx = np.sum((x - x.mean()) ** 2)
  t = sps.t.ppf(0.5 + confidence / 2, max(n - 2, 1))
  half = t * s * np.sqrt(1.0 / n + (grid - x.mean()) ** 2 / sxx)
  return fit, fit - half, fit + half


# ------------------------------------------------------- paired differences


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """Mean of b - a over models, bootstrap CI, sign-flip permutation p."""
  mean_diff: float
  ci_low: float
  ci_high: float
  p_value: float
  n: int
  n_positive: int


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 2000,
                      n_perm: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> PairedDifference:
  """Paired effect of a change (e.g. BatchNorm before the head) across models.

  Args:
    a: (n,) baseline values per model.
    b: (n,) values with the change, same models.
    n_boot, n_perm, seed, confidence: as in ``correlate``; the permutation
      test flips the sign of each model's difference at random.

  Returns:
    ``PairedDifference`` of ``b - a``.
  """
  a, b = _finite_pairs(a, b)
  d = b - a
  n = len(d)
  if n == 0:
    return PairedDifference(*(float("nan"),) * 4, 0, 0)
  mean = float(d.mean())
  rng = np.random.default_rng(seed)
  lo = hi = p = float("nan")
  if n_boot and n > 1:
    lo, hi = _bootstrap_interval(lambda v: v.mean(axis=-1), (d,), n_boot,
                                 confidence, rng)
  if n_perm:
    signs = rng.choice([-1.0, 1.0], size=(n_perm, n))
    perm = np.abs((signs * d).mean(axis=1))
    p = (int(np.sum(perm >= abs(mean) - 1e-12)) + 1) / (n_perm + 1)
  return PairedDifference(mean, lo, hi, p, n, int(np.sum(d > 0)))
