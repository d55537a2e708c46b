"""Accuracy variants as jitted count functions over padded + masked batches.

Each metric is a pair of pure functions:

* ``count(logits, labels, mask) -> dict[str, Array]``: integer counts for one
  batch, jitted. ``mask`` (B,) is False on padding rows (the last batch is
  padded to a fixed shape so every step has the same shape and compiles once);
  padding rows never count, whatever their logits or labels hold.
* ``finalize(sums) -> dict[str, float]``: accuracies in percent from the counts
  summed over all batches.

Counts (not per-batch means) are summed, so the result does not depend on the
batch size or on how examples are split over devices. ``MetricAccumulator`` in
``accumulator.py`` keeps the running sums on device.

Label conventions:

* top-k / mean per-class: ``labels`` (B,) int class indices.
* ReaL: ``labels`` (B, C) multi-hot (bool/int); rows with no positive label
  (3,163 of the 50,000 ImageNet val images) are excluded from both numerator
  and denominator, as in the official ReaL evaluation.
* subset (ImageNet-R / -A): ``logits`` are 1000-way; they are restricted to the
  200 subset columns before the argmax. ``label_space="full"`` means labels are
  1000-class indices; ``label_space="subset"`` means 0..199 positions into
  ``subset_indices`` (the ImageFolder order of the official releases). Both the
  restricted accuracy (``top1``) and the plain 1000-way argmax accuracy
  (``top1_unrestricted``) are returned.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Counts = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Metric:
  """A metric: a jitted per-batch count function and a finaliser.

  Attributes:
    name: short name used in logs.
    count: ``(logits, labels, mask) -> dict of int32 counts`` (jitted).
    finalize: ``dict of summed counts (NumPy) -> dict of percentages``.
  """
  name: str
  count: Callable[..., Counts]
  finalize: Callable[[Mapping[str, np.ndarray]], dict[str, float]]


def _percent(num: np.ndarray, den: np.ndarray) -> float:
  den = float(den)
  return float("nan") if den == 0 else 100.0 * float(num) / den


# ----------------------------------------------------------------- top-k


def ranked_hits(logits: jax.Array, labels: jax.Array, k: int, *,
                positive_only: bool = False) -> jax.Array:
  """Where the label sits among the ``k`` best-scored classes: THE top-k rule.

  Every top-k of the package is this function (the test-set metrics, the
  probes' selection, kNN's top-5, training-loop evaluation): classes are
  ranked by score, ties towards the lower class index (``lax.top_k``, the
  same order as a stable ``argsort`` of ``-scores``); with fewer than ``k``
  classes every class is in the top ``k``.

  Args:
    logits: (B, C) scores.
    labels: (B,) class indices (a label outside ``[0, C)``, e.g. -1, never hits).
    k: how many classes count (>= 1).
    positive_only: a class whose score is not > 0 never counts as a hit
      (kNN: a class no neighbour voted for; with fewer than ``k`` voted
      classes the top-k holds only those, which is what DINO's ``min(5, k)``
      intends, whatever order a sort gives the zero-vote classes).

  Returns:
    (B, min(k, C)) bool: position j holds the label and counts.
  """
  if k < 1:
    raise ValueError(f"top-k needs k >= 1, got {k}")
  # lax.top_k orders +0.0 before -0.0; as equal scores they tie (argsort, argmax).
  logits = jnp.where(logits == 0, jnp.zeros_like(logits), logits)
  values, idx = jax.lax.top_k(logits, min(int(k), logits.shape[1]))
  hit = idx == jnp.asarray(labels).astype(jnp.int32)[:, None]
  if positive_only:
    hit = hit & (values > 0)
  return hit


def topk_hits(logits: jax.Array, labels: jax.Array, k: int, *,
              positive_only: bool = False) -> jax.Array:
  """(B,) bool: the label is among the ``k`` best classes (``ranked_hits``).

  Usable inside ``jit`` (training-loop evaluation); ``scoring.topk_correct``
  runs it on NumPy arrays of any size.
  """
  return jnp.any(ranked_hits(logits, labels, k, positive_only=positive_only), axis=1)


def topk(ks: Sequence[int] = (1, 5)) -> Metric:
  """Top-k accuracy for each ``k`` in ``ks`` (single-label; ``ranked_hits``).

  Args:
    ks: k values, e.g. ``(1, 5)``.

  Returns:
    A ``Metric`` whose finaliser yields ``{"top1": %, "top5": %, ...}``.
  """
  ks = tuple(sorted({int(k) for k in ks}))
  if not ks or ks[0] < 1:
    raise ValueError(f"top-k needs k >= 1, got {ks}")
  return _topk_cached(ks)


@functools.lru_cache(maxsize=None)
def _topk_cached(ks: tuple[int, ...]) -> Metric:
  kmax = max(ks)

  @jax.jit
  def count(logits, labels, mask):
    mask = mask.astype(bool)
    hit = ranked_hits(logits, labels, kmax)
    out = {"n": jnp.sum(mask, dtype=jnp.int32)}
    for k in ks:
      out[f"correct_top{k}"] = jnp.sum(
          jnp.any(hit[:, :k], axis=1) & mask, dtype=jnp.int32)
    return out

  def finalize(sums):
    return {f"top{k}": _percent(sums[f"correct_top{k}"], sums["n"]) for k in ks}

  return Metric(f"top{ks}", count, finalize)


# ------------------------------------------------------------------ ReaL


@functools.lru_cache(maxsize=None)
def real() -> Metric:
  """ImageNet ReaL top-1 (multi-label; empty label lists excluded).

  Returns:
    A ``Metric`` yielding ``{"top1": %}``; ``labels`` are (B, C) multi-hot.
  """

  @jax.jit
  def count(logits, labels, mask):
    labels = labels.astype(bool)
    valid = mask.astype(bool) & jnp.any(labels, axis=1)
    pred = jnp.argmax(logits, axis=1)
    hit = jnp.take_along_axis(labels, pred[:, None], axis=1)[:, 0]
    return {"n": jnp.sum(valid, dtype=jnp.int32),
            "correct_top1": jnp.sum(hit & valid, dtype=jnp.int32)}

  def finalize(sums):
    return {"top1": _percent(sums["correct_top1"], sums["n"])}

  return Metric("real", count, finalize)


def real_labels_to_multihot(label_lists: Sequence[Sequence[int]],
                            num_classes: int = 1000) -> np.ndarray:
  """ReaL label lists (``real.json``) -> (N, C) bool multi-hot matrix.

  Args:
    label_lists: one list of class indices per image (possibly empty).
    num_classes: C.

  Returns:
    (N, C) bool array; rows of empty lists are all False.
  """
  out = np.zeros((len(label_lists), num_classes), bool)
  for i, lst in enumerate(label_lists):
    for c in lst:
      if not 0 <= int(c) < num_classes:
        raise ValueError(f"ReaL label {c} of image {i} outside [0, {num_classes})")
      out[i, int(c)] = True
  return out


# ---------------------------------------------------------------- subset


@functools.lru_cache(maxsize=None)
def _subset_cached(indices: tuple[int, ...], label_space: str) -> Metric:
  idx_np = np.asarray(indices, np.int32)

  @jax.jit
  def count(logits, labels, mask):
    mask = mask.astype(bool)
    labels = labels.astype(jnp.int32)
    idx = jnp.asarray(idx_np)
    if label_space == "full":
      label_full = labels
    else:
      # Padding rows may hold any label; clip so the gather stays in range.
      label_full = idx[jnp.clip(labels, 0, len(indices) - 1)]
    pred_sub = idx[jnp.argmax(logits[:, idx], axis=1)]
    pred_all = jnp.argmax(logits, axis=1)
    return {"n": jnp.sum(mask, dtype=jnp.int32),
            "correct_top1": jnp.sum((pred_sub == label_full) & mask,
                                    dtype=jnp.int32),
            "correct_top1_unrestricted": jnp.sum(
                (pred_all == label_full) & mask, dtype=jnp.int32)}

  def finalize(sums):
    return {"top1": _percent(sums["correct_top1"], sums["n"]),
            "top1_unrestricted": _percent(sums["correct_top1_unrestricted"],
                                          sums["n"])}

  return Metric(f"subset{len(indices)}_{label_space}", count, finalize)


def subset(subset_indices: Sequence[int], label_space: str = "full") -> Metric:
  """Top-1 with logits restricted to a class subset (ImageNet-R / -A).

  Args:
    subset_indices: the subset's class indices in the 1000-class space, in the
      order of the subset's own labels (e.g. ``imagenet_r_indices.txt``).
    label_space: ``"full"`` (labels are 1000-class indices) or ``"subset"``
      (labels are positions 0..len-1 into ``subset_indices``).

  Returns:
    A ``Metric`` yielding ``{"top1": % restricted, "top1_unrestricted": %}``.
  """
  if label_space not in ("full", "subset"):
    raise ValueError(f"label_space must be 'full' or 'subset', got {label_space!r}")
  indices = tuple(int(i) for i in subset_indices)
  if len(set(indices)) != len(indices) or min(indices, default=0) < 0:
    raise ValueError("subset_indices must be distinct non-negative class indices")
  return _subset_cached(indices, label_space)


# ------------------------------------------------------- mean per-class


@functools.lru_cache(maxsize=None)
def mean_per_class(num_classes: int) -> Metric:
  """Mean over classes of per-class top-1 accuracy (balanced accuracy).

  Classes with no example in the whole evaluation set are left out of the
  mean (a class absent from one batch just contributes zero counts there).

  Args:
    num_classes: C.

  Returns:
    A ``Metric`` yielding ``{"mean_per_class": %}``.
  """

  @jax.jit
  def count(logits, labels, mask):
    mask = mask.astype(bool)
    labels = labels.astype(jnp.int32)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)
    onehot = onehot * mask[:, None].astype(jnp.int32)
    hit = (jnp.argmax(logits, axis=1) == labels).astype(jnp.int32)
    return {"per_class_n": jnp.sum(onehot, axis=0),
            "per_class_correct": jnp.sum(onehot * hit[:, None], axis=0)}

  def finalize(sums):
    n = np.asarray(sums["per_class_n"], np.float64)
    c = np.asarray(sums["per_class_correct"], np.float64)
    present = n > 0
    if not present.any():
      return {"mean_per_class": float("nan")}
    return {"mean_per_class": float(100.0 * np.mean(c[present] / n[present]))}

  return Metric(f"mean_per_class{num_classes}", count, finalize)
