"""Helpers shared by the probes: held-out splits and top-k counting."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def topk_hits(logits: np.ndarray, labels: np.ndarray,
              ks: Sequence[int]) -> np.ndarray:
  """Number of examples whose label is in the top-k (stable ranking)."""
  order = np.argsort(-logits, axis=1, kind="stable")
  return np.array([np.sum(np.any(order[:, :k] == labels[:, None], axis=1))
                   for k in ks], np.float64)


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
