"""The primary metric: which one number a test set is compared by.

One definition for the whole package: the results store picks each
measurement's primary row with it (``results.store.primary_mask``), the
analysis decides from it when to compare test sets by their primary metric
(``analysis.table``), and a label space's primary metric is the first of
``PRIMARY_METRICS`` among the metrics it reports (``label_space.LabelSpace``).

* ImageNet ReaL (multi-hot labels): ``real_top1`` (it has no single-label top1);
* ImageNet-R / -A: ``subset_top1`` (their ``top1`` is the unrestricted
  1000-way one);
* every other test set: ``top1``.

No jax import: the analysis reads results without starting a backend.
"""

from __future__ import annotations

from typing import Iterable

# First present wins.
PRIMARY_METRICS: tuple[str, ...] = ("real_top1", "subset_top1", "top1")
# The metric every single-label test set reports; the primary one when none of
# the label-space-specific metrics is present.
DEFAULT_METRIC = PRIMARY_METRICS[-1]
# Name of the per-measurement primary value in exports and the analysis.
PRIMARY = "primary"
# Metrics whose presence means some test set's primary metric is not ``top1``.
SPECIFIC_METRICS: tuple[str, ...] = PRIMARY_METRICS[:-1]
# The rule in words (reports, help texts); kept next to the tuple it describes.
DESCRIPTION = ("real_top1 on ImageNet ReaL, subset_top1 on ImageNet-R / -A, "
               "top1 elsewhere")


def primary_metric(names: Iterable[str]) -> str | None:
  """The primary metric among ``names`` (a measurement's metric names).

  Args:
    names: metric names, e.g. ``{"subset_top1", "top1", "top5"}``.

  Returns:
    The first of ``PRIMARY_METRICS`` in ``names``, or None (e.g. few-shot
    ``top1_mean`` rows have none).
  """
  names = set(names)
  return next((m for m in PRIMARY_METRICS if m in names), None)
