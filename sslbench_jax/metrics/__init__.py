"""Accuracy metrics (top-k, ReaL, subset, mean per-class) over masked batches."""

from sslbench_jax.metrics.accumulator import MetricAccumulator
from sslbench_jax.metrics.accuracy import Metric
from sslbench_jax.metrics.accuracy import mean_per_class
from sslbench_jax.metrics.accuracy import real
from sslbench_jax.metrics.accuracy import real_labels_to_multihot
from sslbench_jax.metrics.accuracy import subset
from sslbench_jax.metrics.accuracy import topk

__all__ = ["Metric", "MetricAccumulator", "mean_per_class", "real",
           "real_labels_to_multihot", "subset", "topk"]
