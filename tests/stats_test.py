"""analysis.stats vs SciPy and hand formulas; bootstrap coverage."""

import numpy as np
import pytest
from scipy import stats as sps

from sslbench_jax.analysis import stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlations_match_scipy_on_random_data(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=26)
  y = 0.6 * x + rng.normal(size=26)
  # Ties (rounded values) exercise the tie corrections of spearman/kendall.
  xt, yt = np.round(x, 0), np.round(y, 0)
  for a, b in ((x, y), (xt, yt)):
    assert stats.pearson(a, b) == pytest.approx(sps.pearsonr(a, b)[0], abs=1e-12)
    assert stats.spearman(a, b) == pytest.approx(sps.spearmanr(a, b)[0], abs=1e-12)
    assert stats.kendall(a, b) == pytest.approx(sps.kendalltau(a, b)[0], abs=1e-12)


def test_batched_correlations_equal_loop():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(5, 12))
  y = rng.normal(size=(5, 12))
  for fn, ref in ((stats.pearson, sps.pearsonr), (stats.spearman, sps.spearmanr),
                  (stats.kendall, sps.kendalltau)):
    np.testing.assert_allclose(fn(x, y), [ref(a, b)[0] for a, b in zip(x, y)],
                               atol=1e-12)


def test_average_ranks_match_rankdata_and_handle_nan():
  rng = np.random.default_rng(4)
  a = rng.integers(0, 6, size=(4, 15)).astype(float)
  np.testing.assert_allclose(stats.average_ranks(a), sps.rankdata(a, axis=-1))
  np.testing.assert_allclose(stats.average_ranks(a, descending=True),
                             sps.rankdata(-a, axis=-1))
  r = stats.average_ranks(np.array([3.0, np.nan, 1.0, 3.0]), descending=True)
  np.testing.assert_allclose(r, [1.5, np.nan, 3.0, 1.5])


def test_constant_input_gives_nan():
  assert np.isnan(stats.pearson(np.ones(5), np.arange(5.0)))
  res = stats.correlate(np.ones(6), np.arange(6.0), "kendall", n_boot=50, n_perm=50)
  assert np.isnan(res.r) and np.isnan(res.p_value)


def test_permutation_p_value_matches_scipy_permutation_test():
  rng = np.random.default_rng(5)
  x = rng.normal(size=20)
  y = 0.4 * x + rng.normal(size=20)
  res = stats.correlate(x, y, "pearson", n_boot=0, n_perm=4000, seed=1)
  ref = sps.permutation_test((x, y), lambda a, b: sps.pearsonr(a, b)[0],
                             permutation_type="pairings", n_resamples=4000,
                             random_state=2).pvalue
  # Two Monte Carlo estimates of the same p: agree within sampling error.
  assert abs(res.p_value - ref) < 4 * np.sqrt(ref * (1 - ref) / 4000) + 2e-3
  # And both close to the exact t-test p for this n.
  assert abs(res.p_value - sps.pearsonr(x, y)[1]) < 0.03


@pytest.mark.parametrize("method,truth", [
    ("pearson", lambda rho: rho),
    ("spearman", lambda rho: 6 / np.pi * np.arcsin(rho / 2)),
    ("kendall", lambda rho: 2 / np.pi * np.arcsin(rho)),
])
def test_bootstrap_interval_coverage_near_nominal(method, truth):
  rho, n, reps = 0.5, 40, 200
  rng = np.random.default_rng(11)
  cov = [[1, rho], [rho, 1]]
  hits = 0
  for rep in range(reps):
    xy = rng.multivariate_normal([0, 0], cov, size=n)
    res = stats.correlate(xy[:, 0], xy[:, 1], method, n_boot=400, n_perm=0, seed=rep)
    hits += res.ci_low <= truth(rho) <= res.ci_high
  # Nominal 0.95; binomial sd over 200 reps ~0.015; the percentile bootstrap
  # undercovers a little at n=40, so allow [0.88, 0.99].
  assert 0.88 <= hits / reps <= 0.99, hits / reps


def test_partial_correlation_matches_formula():
  rng = np.random.default_rng(6)
  n = 30
  z = (np.arange(n) % 2).astype(float)  # a family indicator
  x = 2 * z + rng.normal(size=n)
  y = 3 * z + 0.5 * x + rng.normal(size=n)
  rxy = sps.pearsonr(x, y)[0]
  rxz = sps.pearsonr(x, z)[0]
  ryz = sps.pearsonr(y, z)[0]
  formula = (rxy - rxz * ryz) / np.sqrt((1 - rxz ** 2) * (1 - ryz ** 2))
  res = stats.partial_correlation(x, y, z, n_boot=200, n_perm=200)
  assert res.r == pytest.approx(formula, abs=1e-10)
  assert res.ci_low <= res.r <= res.ci_high
  assert res.n == n


def test_loo_linear_error_matches_manual():
  x = np.array([1.0, 2.0, 3.0, 4.0, 6.0])
  y = np.array([1.0, 3.0, 2.0, 5.0, 4.0])
  # Manual: remove point i, closed-form slope/intercept, predict.
  errs = []
  for i in range(5):
    xs, ys = np.delete(x, i), np.delete(y, i)
    b = np.sum((xs - xs.mean()) * (ys - ys.mean())) / np.sum((xs - xs.mean()) ** 2)
    a = ys.mean() - b * xs.mean()
    errs.append(a + b * x[i] - y[i])
  errs = np.array(errs)
  fit = stats.loo_linear_error(x, y)
  assert fit.rmse == pytest.approx(np.sqrt(np.mean(errs ** 2)), abs=1e-12)
  assert fit.mae == pytest.approx(np.mean(np.abs(errs)), abs=1e-12)
  np.testing.assert_allclose(fit.predictions - y, errs, atol=1e-12)


def test_paired_difference():
  rng = np.random.default_rng(7)
  a = rng.normal(50, 5, size=20)
  b = a + 1.0 + rng.normal(0, 0.5, size=20)
  res = stats.paired_difference(a, b, n_boot=500, n_perm=2000)
  assert res.mean_diff == pytest.approx(np.mean(b - a), abs=1e-12)
  assert res.ci_low < res.mean_diff < res.ci_high
  assert res.p_value < 0.01
  assert res.n_positive == int(np.sum(b > a))
  # Sign-flip test vs scipy's paired permutation test on a weak effect.
  b2 = a + rng.normal(0.2, 1.0, size=20)
  mine = stats.paired_difference(a, b2, n_boot=0, n_perm=4000, seed=3).p_value
  ref = sps.permutation_test((b2 - a,), np.mean, permutation_type="samples",
                             n_resamples=4000, random_state=0).pvalue
  assert abs(mine - ref) < 0.04


def test_linear_fit_band_contains_fit_and_matches_formula_at_mean():
  rng = np.random.default_rng(8)
  x = rng.normal(size=25)
  y = x + rng.normal(size=25)
  fit, lo, hi = stats.linear_fit_band(x, y, np.array([x.mean()]))
  res = sps.linregress(x, y)
  s = np.sqrt(np.sum((y - res.intercept - res.slope * x) ** 2) / 23)
  half = sps.t.ppf(0.975, 23) * s / np.sqrt(25)
  assert fit[0] == pytest.approx(res.intercept + res.slope * x.mean(), abs=1e-10)
  assert hi[0] - fit[0] == pytest.approx(half, abs=1e-10)
