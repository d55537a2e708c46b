"""Logistic regression sweep vs scikit-learn's LogisticRegression (lbfgs)."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from sslbench_jax.probes import logreg


@pytest.fixture(scope="module")
def digits():
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  return x[:1100], y[:1100], x[1100:], y[1100:]


def test_matches_sklearn_for_every_c(digits):
  xtr, ytr, xte, yte = digits
  cs = [1e-3, 0.03, 1.0]
  # chunk that does not divide N exercises the padded, chunked data term
  w, b = logreg.fit(xtr, ytr, 10, cs, chunk=300)
  assert w.shape == (3, 64, 10) and b.shape == (3, 10)
  for i, c in enumerate(cs):
    ref = LogisticRegression(C=c, max_iter=5000, tol=1e-9).fit(xtr, ytr)
    ours = logreg.objective(w[i], b[i], xtr, ytr, c)
    theirs = logreg.objective(ref.coef_.T, ref.intercept_, xtr, ytr, c)
    assert abs(ours - theirs) <= 1e-3 * theirs
    acc = 100 * np.mean((xte @ w[i] + b[i]).argmax(1) == yte)
    assert abs(acc - 100 * ref.score(xte, yte)) <= 0.5
    # the objective's scaling: its minimiser is sklearn's, not a rescaled one
    np.testing.assert_allclose(w[i], ref.coef_.T, atol=2e-2 * np.abs(ref.coef_).max())


def test_selection_uses_holdout_only(digits):
  xtr, ytr, xte, yte = digits
  cs = np.logspace(-4, 0, 5)
  r = logreg.fit_select(xtr, ytr, xte, yte, 10, cs, seed=0, max_iter=200)
  r_perm = logreg.fit_select(xtr, ytr, xte, np.random.default_rng(0).permutation(yte),
                      10, cs, seed=0, max_iter=200)
  assert r.selected == r_perm.selected and r.holdout_top1 == r_perm.holdout_top1
  assert r.selected == pytest.approx(cs[int(np.argmax(r.holdout_top1))])
  ref = LogisticRegression(C=r.selected, max_iter=5000, tol=1e-9).fit(xtr, ytr)
  assert abs(r.test_top1 - 100 * ref.score(xte, yte)) <= 0.5
  assert r.selection == "holdout" and r.n_test == len(yte)
  best = logreg.fit_select(xtr, ytr, xte, yte, 10, cs, select_on_test=True, max_iter=200)
  assert best.selection == "max over test"
  assert best.test_top1 == pytest.approx(max(best.holdout_top1))
  assert best.test_top1 >= r.test_top1


def test_test_scores_are_the_refitted_models(digits):
  """``test_scores`` (for the test set's own metrics) are the logits of the
  selected C refitted on all of train; test labels are optional."""
  xtr, ytr, xte, yte = digits
  cs = [1e-3, 0.1]
  r = logreg.fit_select(xtr, ytr, xte, yte, 10, cs, max_iter=100)
  (w,), (b,) = logreg.fit(xtr, ytr, 10, [r.selected], max_iter=100)
  np.testing.assert_allclose(r.test_scores, xte @ w + b, rtol=1e-6, atol=1e-6)
  order = np.argsort(-r.test_scores, axis=1, kind="stable")
  assert r.test_top1 == pytest.approx(100 * np.mean(order[:, 0] == yte))
  assert r.test_top5 == pytest.approx(
      100 * np.mean(np.any(order[:, :5] == yte[:, None], axis=1)))
  r0 = logreg.fit_select(xtr, ytr, xte, None, 10, cs, max_iter=100)
  assert r0.selected == r.selected and np.isnan(r0.test_top1)
  np.testing.assert_array_equal(r0.test_scores, r.test_scores)
  with pytest.raises(ValueError, match="needs single-label"):
    logreg.fit_select(xtr, ytr, xte, None, 10, cs, select_on_test=True, max_iter=100)


def test_warm_started_path_equals_cold_starts(digits):
  """The path's warm starts change where L-BFGS starts, not what it finds."""
  xtr, ytr, _, _ = digits
  cs = [3.0, 1e-3, 0.1]  # unsorted on purpose: results come back in input order
  w, b = logreg.fit(xtr[:300], ytr[:300], 10, cs)
  for i, c in enumerate(cs):
    (w1,), (b1,) = logreg.fit(xtr[:300], ytr[:300], 10, [c])  # from zero
    ours = logreg.objective(w[i], b[i], xtr[:300], ytr[:300], c)
    cold = logreg.objective(w1, b1, xtr[:300], ytr[:300], c)
    assert abs(ours - cold) <= 1e-3 * cold


def test_bad_inputs():
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="positive"):
    logreg.fit(x, np.array([0, 1, 0, 1]), 2, [0.0])
  with pytest.raises(ValueError, match="labels must lie"):
    logreg.fit(x, np.array([0, 1, 0, 5]), 2, [1.0])


def test_progress_bar_changes_no_number(digits, capfd):
  xtr, ytr, _, _ = digits
  cs = [1e-2, 1.0, 0.1]
  capfd.readouterr()
  quiet = logreg.fit(xtr[:300], ytr[:300], 10, cs, max_iter=50, progress=False)
  assert "logreg C" not in capfd.readouterr().err
  shown = logreg.fit(xtr[:300], ytr[:300], 10, cs, max_iter=50, progress=True)
  err = capfd.readouterr().err
  # the rate reads C/s, or s/C when a solve takes over a second
  assert "logreg C" in err and "3/3" in err and ("C/s" in err or "s/C" in err)
  np.testing.assert_array_equal(shown[0], quiet[0])
  np.testing.assert_array_equal(shown[1], quiet[1])
  assert np.abs(quiet[0][1]).max() > np.abs(quiet[0][0]).max() > 0  # C matters
