"""Metrics: accuracy variants, the test-set scoring of every protocol, the primary metric.

* ``accuracy``: jitted count metrics over padded + masked batches (top-k,
  ReaL, subset, mean per-class) and ``topk_hits``, the package's one top-k rule.
* ``accumulator``: running sums of those counts on device.
* ``label_space``: what a feature file records about its labels
  (``LabelSpace``), read without any dataset registry lookup.
* ``scoring``: ``resolve`` + ``evaluate``: class scores -> the test set's
  metrics in its own label space (the public entry point).
* ``primary``: the one definition of a test set's primary metric.

Attributes of the jax-based modules are imported lazily, so that importing
``metrics.primary`` or ``metrics.label_space`` (results, analysis, data) does
not import jax.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "MetricAccumulator": "sslbench_jax.metrics.accumulator",
    "Metric": "sslbench_jax.metrics.accuracy",
    "mean_per_class": "sslbench_jax.metrics.accuracy",
    "real": "sslbench_jax.metrics.accuracy",
    "real_labels_to_multihot": "sslbench_jax.metrics.accuracy",
    "subset": "sslbench_jax.metrics.accuracy",
    "topk": "sslbench_jax.metrics.accuracy",
    "topk_hits": "sslbench_jax.metrics.accuracy",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  if name in ("accuracy", "accumulator", "label_space", "primary", "scoring"):
    return importlib.import_module(f"sslbench_jax.metrics.{name}")
  raise AttributeError(f"module 'sslbench_jax.metrics' has no attribute {name!r}")
