"""Few-shot subsets and end-to-end few-shot probes on scikit-learn digits."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from sslbench_jax.probes import fewshot


def test_parse_setup():
  assert fewshot.parse_setup("5shot") == (5, None)
  assert fewshot.parse_setup("25-shot") == (25, None)
  assert fewshot.parse_setup("1%") == (None, 0.01)
  for bad in ("0shot", "shot", "150%", "ten"):
    with pytest.raises(ValueError, match="few-shot setup"):
      fewshot.parse_setup(bad)


def test_subset_counts_seeding_and_tries():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 7, 2000)
  for shots in (1, 5, 25):
    idx = fewshot.sample_subset(labels, 7, shots=shots, seed=3, trial=0)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=7), [shots] * 7)
    assert len(np.unique(idx)) == len(idx)
    np.testing.assert_array_equal(
        idx, fewshot.sample_subset(labels, 7, shots=shots, seed=3, trial=0))
    assert not np.array_equal(
        idx, fewshot.sample_subset(labels, 7, shots=shots, seed=3, trial=1))
    assert not np.array_equal(
        idx, fewshot.sample_subset(labels, 7, shots=shots, seed=4, trial=0))
  # percent of labels: int(f * N / C) per class, as the Closer Look study
  idx = fewshot.sample_subset(labels, 7, fraction=0.1, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=7),
                                [int(0.1 * 2000 / 7)] * 7)
  with pytest.raises(ValueError, match="class 3 has 2 training examples"):
    small = np.array([0] * 10 + [1] * 10 + [2] * 10 + [3] * 2)
    fewshot.sample_subset(small, 4, shots=5)


def _ridge_predict(xtr, ytr, xte, classes, l2):
  xtr = xtr.astype(np.float64)
  mean, std = xtr.mean(0), xtr.std(0) + 1e-5
  aug = lambda x: np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
  a = aug(xtr)
  w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ (2 * np.eye(classes)[ytr] - 1))
  return (aug(xte) @ w).argmax(1)


def test_end_to_end_on_digits():
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  xtr, ytr, xte, yte = x[:1200], y[:1200], x[1200:], y[1200:]
  setups = ("1shot", "10shot", "5%")
  res = fewshot.sweep(xtr, ytr, xte, yte, 10, fewshot.Options(
      setups=setups, tries=3, fewshot_k=20, knn_metric="euclidean", fewshot_l2=4.0,
      fewshot_probes=("knn", "leastsquares", "linear")), seed=1)
  assert [(r.setup, r.probe) for r in res] == [
      (s, p) for s in setups for p in ("knn", "leastsquares", "linear")]
  for r in res:
    shots, fraction = fewshot.parse_setup(r.setup)
    assert r.per_class == (shots or int(fraction * 1200 / 10))
    assert len(r.top1) == 3 and r.n_test == len(yte)
    assert r.mean == pytest.approx(np.mean(r.top1))
    assert r.std == pytest.approx(np.std(r.top1))
    assert len(set(r.top1)) > 1 or r.per_class > 10  # tries differ
    for t in range(3):
      idx = fewshot.sample_subset(ytr, 10, shots, fraction, seed=1, trial=t)
      if r.probe == "knn":
        k = min(20, len(idx))
        pred = KNeighborsClassifier(k, weights="distance").fit(xtr[idx], ytr[idx]).predict(xte)
      elif r.probe == "leastsquares":
        pred = _ridge_predict(xtr[idx], ytr[idx], xte, 10, 4.0)
      else:
        continue
      assert r.top1[t] == pytest.approx(100 * np.mean(pred == yte))
  by = {(r.setup, r.probe): r for r in res}
  # more labels help, and a linear head on 10 digits per class is far above chance
  assert by[("10shot", "knn")].mean > by[("1shot", "knn")].mean
  assert by[("10shot", "linear")].mean > 70.0


def test_unknown_probe():
  with pytest.raises(ValueError, match="fewshot_probes\\[0\\]='svm' must be one of knn, "
                     "linear, leastsquares"):
    fewshot.Options(fewshot_probes=("svm",))


def test_progress_bar_changes_no_number(capfd):
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  kwargs = dict(options=fewshot.Options(setups=("1shot", "5shot"),
                                        fewshot_probes=("leastsquares", "linear"),
                                        tries=2, fewshot_l2=4.0),
                seed=3, probe_overrides={"linear": dict(epochs=3, batch_size=16,
                                                        warmup_epochs=1)})
  capfd.readouterr()
  quiet = fewshot.sweep(x[:600], y[:600], x[600:], y[600:], 10, progress=False,
                      **kwargs)
  assert "fewshot" not in capfd.readouterr().err
  shown = fewshot.sweep(x[:600], y[:600], x[600:], y[600:], 10, progress=True,
                      **kwargs)
  err = capfd.readouterr().err
  # one bar over (setup, probe, try); the linear fits inside show none
  assert "fewshot" in err and "8/8" in err and "linear (" not in err
  assert [r.metrics for r in shown] == [r.metrics for r in quiet]
  assert len({r.mean for r in quiet}) > 1
