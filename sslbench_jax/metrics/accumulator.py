"""Running sums of a metric's counts over batches, kept on device."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from sslbench_jax.metrics.accuracy import Metric


@jax.jit
def _add(a, b):
  return jax.tree_util.tree_map(lambda x, y: x + y, a, b)


class MetricAccumulator:
  """Accumulates ``metric.count`` over batches; ``finalize`` -> percentages.

  The sums stay on device between batches (no host round trip per step); one
  transfer happens in ``finalize``.

  Example:
    >>> acc = MetricAccumulator(topk((1, 5)))
    >>> for logits, labels, mask in batches:
    ...   acc.update(logits, labels, mask)
    >>> acc.finalize()  # {"top1": 76.1, "top5": 92.9}
  """

  def __init__(self, metric: Metric):
    self.metric = metric
    self._sums: dict[str, Any] | None = None

  def update(self, logits: Any, labels: Any, mask: Any) -> None:
    """Adds one (padded) batch.

    Args:
      logits: (B, C) scores.
      labels: (B,) ints or (B, C) multi-hot, as the metric expects.
      mask: (B,) bool, False on padding rows.
    """
    counts = self.metric.count(logits, labels, mask)
    self._sums = counts if self._sums is None else _add(self._sums, counts)

  def counts(self) -> dict[str, np.ndarray]:
    """The summed counts as NumPy arrays (empty dict before any update)."""
    if self._sums is None:
      return {}
    return {k: np.asarray(v) for k, v in jax.device_get(self._sums).items()}

  def finalize(self) -> dict[str, float]:
    """Accuracies in percent over everything seen so far.

    Returns:
      The metric's values (NaN when no unmasked example was seen).

    Raises:
      ValueError: if ``update`` was never called.
    """
    if self._sums is None:
      raise ValueError(f"metric {self.metric.name}: finalize() before any update()")
    return self.metric.finalize(self.counts())
