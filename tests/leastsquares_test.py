"""Closed-form least squares (big_vision few-shot) vs a NumPy solve."""

import numpy as np
import pytest

from sslbench_jax.probes import leastsquares


def _reference(xtr, ytr, xte, classes, l2):
  """Float64 ridge regression on standardised features + bias column 100."""
  xtr = xtr.astype(np.float64)
  mean, std = xtr.mean(0), xtr.std(0) + 1e-5
  aug = lambda x: np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
  a = aug(xtr)
  y = 2.0 * np.eye(classes)[ytr] - 1.0
  w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ y)
  return aug(xte.astype(np.float64)) @ w


@pytest.mark.parametrize("n,d", [(300, 20), (40, 90)])  # N >= D and D > N
def test_matches_numpy_solve(n, d):
  rng = np.random.default_rng(n)
  classes = 6
  centres = rng.normal(size=(classes, d))
  ytr = rng.integers(0, classes, n)
  xtr = (centres[ytr] + rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d)).astype(np.float32)
  xte = rng.normal(size=(50, d)).astype(np.float32)
  cache = leastsquares.precompute(xtr, ytr, classes)
  for l2 in (2.0 ** -3, 1.0, 2.0 ** 6):
    ref = _reference(xtr, ytr, xte, classes, l2)
    ours = leastsquares.predict(cache, xte, l2)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(ours.argmax(1), ref.argmax(1))


def test_run_selects_on_holdout():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 30))
  ytr, yte = rng.integers(0, 4, 200), rng.integers(0, 4, 80)
  xtr = (centres[ytr] + 2 * rng.normal(size=(200, 30))).astype(np.float32)
  xte = (centres[yte] + 2 * rng.normal(size=(80, 30))).astype(np.float32)
  l2s = [2.0 ** i for i in range(-4, 12, 3)]
  r = leastsquares.fit_select(xtr, ytr, xte, yte, 4, l2s)
  r2 = leastsquares.fit_select(xtr, ytr, xte, rng.permutation(yte), 4, l2s)
  assert r.selected == r2.selected and r.holdout_top1 == r2.holdout_top1
  ref = _reference(xtr, ytr, xte, 4, r.selected)
  assert r.test_top1 == pytest.approx(100 * np.mean(ref.argmax(1) == yte))
  # the refitted model's scores, for the test set's own metrics
  np.testing.assert_allclose(r.test_scores, ref, rtol=1e-6, atol=1e-8)
  r0 = leastsquares.fit_select(xtr, ytr, xte, None, 4, l2s)
  assert r0.selected == r.selected and np.isnan(r0.test_top1)
  np.testing.assert_array_equal(r0.test_scores, r.test_scores)
  # "max over test": the l2 whose test top-1 is best, its scores
  best = leastsquares.fit_select(xtr, ytr, xte, yte, 4, l2s, select_on_test=True)
  accs = [100 * np.mean(_reference(xtr, ytr, xte, 4, l2).argmax(1) == yte)
          for l2 in l2s]
  assert best.selection == "max over test"
  assert best.selected == l2s[int(np.argmax(accs))]
  assert best.holdout_top1 == pytest.approx(accs)
  np.testing.assert_allclose(best.test_scores,
                             _reference(xtr, ytr, xte, 4, best.selected),
                             rtol=1e-6, atol=1e-8)


def test_float32_mode_is_close():
  """float32 (big_vision's arithmetic) keeps ~3 digits: the bias column of 100
  makes the Gram matrix ill-conditioned."""
  rng = np.random.default_rng(1)
  ytr = rng.integers(0, 3, 200)
  xtr = (np.eye(3, 10)[ytr] * 3 + rng.normal(size=(200, 10))).astype(np.float32)
  xte = rng.normal(size=(30, 10)).astype(np.float32)
  ref = _reference(xtr, ytr, xte, 3, 64.0)
  ours = leastsquares.predict(leastsquares.precompute(xtr, ytr, 3, "float32"), xte, 64.0)
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=3e-3 * np.abs(ref).max())
