"""Metrics vs NumPy references, over padded + masked batches."""

import importlib.resources

import numpy as np
import pytest

from sslbench_jax import metrics


def _batches(arrays, batch_size, rng):
  """Splits arrays into fixed-size batches; pads the last one with garbage."""
  n = len(arrays[0])
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    out = []
    for a in arrays:
      chunk = a[start:stop]
      if pad:
        # Garbage that WOULD count if the mask were ignored: copies of real rows.
        chunk = np.concatenate([chunk, a[:pad]], axis=0)
      out.append(chunk)
    mask = np.arange(batch_size) < (stop - start)
    yield (*out, mask)


def _run(metric, logits, labels, batch_size=32, seed=0):
  acc = metrics.MetricAccumulator(metric)
  for lg, lb, m in _batches((logits, labels), batch_size, np.random.default_rng(seed)):
    acc.update(lg, lb, m)
  return acc.finalize()


def _np_topk(logits, labels, k):
  order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return 100.0 * np.mean(np.any(order == labels[:, None], axis=1))


def test_topk_matches_numpy_with_padding():
  rng = np.random.default_rng(0)
  n, c = 203, 50  # 203 = 6 full batches of 32 + a padded one
  logits = rng.normal(size=(n, c)).astype(np.float32)
  labels = rng.integers(0, c, size=n)
  # Make a good share correct so the numbers are not trivially small.
  labels[:80] = np.argmax(logits[:80], axis=1)
  got = _run(metrics.topk((1, 5)), logits, labels)
  assert got["top1"] == pytest.approx(_np_topk(logits, labels, 1), abs=1e-9)
  assert got["top5"] == pytest.approx(_np_topk(logits, labels, 5), abs=1e-9)
  # Sanity: padding really would change the number if it were counted.
  wrong = 100.0 * np.mean(np.concatenate(
      [np.argmax(logits, 1) == labels, (np.argmax(logits, 1) == labels)[:21]]))
  assert abs(wrong - got["top1"]) > 1e-3


def test_topk_counts_are_batch_size_independent():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(100, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=100)
  a = _run(metrics.topk((1, 3)), logits, labels, batch_size=7)
  b = _run(metrics.topk([3, 1]), logits, labels, batch_size=64)
  assert a == b


def test_real_excludes_empty_lists_and_padding():
  rng = np.random.default_rng(2)
  n, c = 150, 20
  logits = rng.normal(size=(n, c)).astype(np.float32)
  lists = []
  for i in range(n):
    if i % 7 == 0:
      lists.append([])
    else:
      size = rng.integers(1, 4)
      lists.append(list(rng.choice(c, size=size, replace=False)))
    if i % 3 == 0 and lists[-1]:
      lists[-1].append(int(np.argmax(logits[i])))
  multihot = metrics.real_labels_to_multihot(lists, c)
  pred = np.argmax(logits, axis=1)
  scored = [i for i in range(n) if lists[i]]
  expected = 100.0 * np.mean([pred[i] in lists[i] for i in scored])
  got = _run(metrics.real(), logits, multihot, batch_size=32)
  assert got["top1"] == pytest.approx(expected, abs=1e-9)


def test_real_labels_out_of_range_rejected():
  with pytest.raises(ValueError, match="outside"):
    metrics.real_labels_to_multihot([[3, 1000]], 1000)


@pytest.mark.parametrize("label_space", ["full", "subset"])
def test_subset_accuracy_restricts_logits(label_space):
  rng = np.random.default_rng(3)
  n, c = 120, 1000
  # The real ImageNet-R subset (package data), in its own label order.
  text = (importlib.resources.files("sslbench_jax") / "data" / "meta"
          / "imagenet_r_indices.txt").read_text()
  idx = np.array([int(t) for t in text.split()])
  assert len(idx) == 200
  logits = rng.normal(size=(n, c)).astype(np.float32)
  # Put the global maximum outside the subset for many rows: restricted and
  # unrestricted accuracies must then differ.
  outside = np.setdiff1d(np.arange(c), idx)
  logits[::2, outside[0]] += 10.0
  pos = rng.integers(0, 200, size=n)
  pos[:50] = np.argmax(logits[:50][:, idx], axis=1)
  label_full = idx[pos]
  labels = label_full if label_space == "full" else pos
  got = _run(metrics.subset(idx, label_space), logits, labels, batch_size=32)
  restricted = 100.0 * np.mean(idx[np.argmax(logits[:, idx], 1)] == label_full)
  unrestricted = 100.0 * np.mean(np.argmax(logits, 1) == label_full)
  assert got["top1"] == pytest.approx(restricted, abs=1e-9)
  assert got["top1_unrestricted"] == pytest.approx(unrestricted, abs=1e-9)
  assert got["top1"] > got["top1_unrestricted"]


def test_subset_rejects_bad_label_space():
  with pytest.raises(ValueError, match="label_space"):
    metrics.subset([1, 2, 3], "imagenet")


def test_mean_per_class_with_absent_classes():
  rng = np.random.default_rng(4)
  n, c = 97, 12
  labels = rng.integers(0, 10, size=n)  # classes 10 and 11 never appear
  labels[:5] = 9  # class 9 only in the first batch
  labels[5:][labels[5:] == 9] = 0
  logits = rng.normal(size=(n, c)).astype(np.float32)
  logits[np.arange(0, n, 2), labels[::2]] += 2.0
  pred = np.argmax(logits, 1)
  per_class = [np.mean(pred[labels == k] == k) for k in range(c) if np.any(labels == k)]
  expected = 100.0 * np.mean(per_class)
  got = _run(metrics.mean_per_class(c), logits, labels, batch_size=16)
  assert got["mean_per_class"] == pytest.approx(expected, abs=1e-9)
  # Differs from plain accuracy on this imbalanced set (a real check).
  assert abs(got["mean_per_class"] - 100.0 * np.mean(pred == labels)) > 1e-3


def test_all_padding_batch_and_finalize_before_update():
  acc = metrics.MetricAccumulator(metrics.topk((1,)))
  with pytest.raises(ValueError, match="before any update"):
    acc.finalize()
  acc.update(np.zeros((4, 3), np.float32), np.zeros(4, np.int32), np.zeros(4, bool))
  assert np.isnan(acc.finalize()["top1"])


def test_topk_with_fewer_classes_than_k():
  logits = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]], np.float32)
  labels = np.array([0, 0])
  got = _run(metrics.topk((1, 5)), logits, labels, batch_size=4)
  assert got == {"top1": 50.0, "top5": 100.0}
