"""Per-model aggregates across datasets, ranks, and ImageNet-variant rank changes."""

from __future__ import annotations

import numpy as np

from sslbench_jax.analysis import names
from sslbench_jax.analysis import stats
from sslbench_jax.analysis.table import ResultsTable

AGGREGATE_COLUMNS = ("suite", "model", "protocol", "backbone", "method_family",
                     "n_datasets", "mean", "weighted_mean", "geometric_mean",
                     "mean_rank")
# ``benchmark``: ImageNet val + the transfer datasets; ``imagenet_variants``:
# ImageNet val + every ImageNet evaluation variant present (ReaL, the three
# v2 test sets, R, Sketch, A) -- the "benchmark lottery" aggregates.
BENCHMARK = "benchmark"
IMAGENET_VARIANTS = "imagenet_variants"
SUITES = (BENCHMARK, IMAGENET_VARIANTS)
RANK_CHANGE_COLUMNS = ("model", "protocol", "variant", "value_imagenet",
                       "value_variant", "rank_imagenet", "rank_variant",
                       "rank_change", "n_models")


def aggregate_matrix(values: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
  """Row-wise aggregates of a (models x datasets) accuracy matrix.

  Missing cells (NaN) are skipped, so a model's aggregates are over the
  datasets it has.

  Args:
    values: (M, D) accuracies in percent, NaN where missing.
    weights: (M, D) test-set sizes (n_examples).

  Returns:
    dict of (M,) arrays: ``mean`` (arithmetic), ``weighted_mean`` (weighted by
    n_examples), ``geometric_mean`` (0 if any accuracy is 0), ``ranks`` (M, D)
    per-dataset ranks (1 = best, ties averaged, among models present),
    ``mean_rank``, ``n_datasets``.
  """
  values = np.asarray(values, np.float64)
  valid = ~np.isnan(values)
  w = np.where(valid, np.asarray(weights, np.float64), 0.0)
  v0 = np.where(valid, values, 0.0)
  n = valid.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = v0.sum(axis=1) / n
    weighted = (w * v0).sum(axis=1) / w.sum(axis=1)
    logs = np.where(valid, np.log(np.where(valid, values, 1.0)), 0.0)
    geo = np.exp(logs.sum(axis=1) / n)
  ranks = stats.average_ranks(values.T, descending=True).T
  with np.errstate(invalid="ignore"):
    mean_rank = np.nansum(ranks, axis=1) / n
  return {"mean": mean, "weighted_mean": weighted, "geometric_mean": geo,
          "ranks": ranks, "mean_rank": mean_rank, "n_datasets": n}


def suite_datasets(table: ResultsTable, suite: str) -> list[str]:
  """The datasets a suite aggregates over (present in ``table``).

  Args:
    table: the results.
    suite: ``"benchmark"`` (ImageNet val + transfer datasets) or
      ``"imagenet_variants"`` (ImageNet val + the variants present; empty when
      no variant is present).

  Returns:
    Canonical dataset keys, in ``table.datasets`` order.
  """
  if suite == BENCHMARK:
    return table.benchmark_datasets
  if suite == IMAGENET_VARIANTS:
    variants = [d for d in table.datasets if d in names.VARIANTS]
    if not variants:
      return []
    return [d for d in table.datasets if d == names.IN_DOMAIN] + variants
  raise ValueError(f"unknown suite {suite!r}; valid: {SUITES}")


def aggregates(table: ResultsTable) -> list[dict]:
  """One row per (suite, model, protocol) with ``AGGREGATE_COLUMNS``.

  Suites (``suite_datasets``): ``benchmark`` runs over ImageNet val and the
  transfer datasets present; ``imagenet_variants`` over ImageNet val and the
  evaluation variants present. The weighted mean weighs every test set by
  its size as stored in the results rows (``n_examples``: images scored, e.g.
  46,837 for ReaL, 30,000 for R, 10,000 per v2 test set). Ranks are per
  dataset among the models that have it.

  Args:
    table: the results.

  Returns:
    List of dicts, suite-major, then protocol, models sorted by name.
  """
  rows = []
  for suite in SUITES:
    datasets = suite_datasets(table, suite)
    if not datasets:
      continue
    for protocol in table.protocols:
      models = [m for m in table.models
                if any((m, protocol, d) in table.values for d in datasets)]
      if not models:
        continue
      v, n = table.matrix(protocol, datasets, models)
      agg = aggregate_matrix(v, n)
      for i, m in enumerate(models):
        rows.append({"suite": suite, "model": m, "protocol": protocol,
                     "backbone": table.backbone.get(m, names.UNKNOWN),
                     "method_family": table.method_family.get(m, names.UNKNOWN),
                     "n_datasets": int(agg["n_datasets"][i]),
                     **{k: float(agg[k][i]) for k in
                        ("mean", "weighted_mean", "geometric_mean", "mean_rank")}})
  return rows


def rank_changes(table: ResultsTable) -> list[dict]:
  """Rank of every model on ImageNet val vs on each ImageNet variant.

  Ranks are among the models that have both numbers (1 = best, ties
  averaged); ``rank_change = rank_variant - rank_imagenet`` (positive: the
  model falls behind on the variant).

  Args:
    table: the results.

  Returns:
    Rows with ``RANK_CHANGE_COLUMNS``.
  """
  rows = []
  for protocol in table.protocols:
    for variant in names.VARIANTS:
      models = [m for m in table.models
                if (m, protocol, names.IN_DOMAIN) in table.values
                and (m, protocol, variant) in table.values]
      if not models:
        continue
      v, _ = table.matrix(protocol, [names.IN_DOMAIN, variant], models)
      r = stats.average_ranks(v.T, descending=True)
      for i, m in enumerate(models):
        rows.append({"model": m, "protocol": protocol, "variant": variant,
                     "value_imagenet": float(v[i, 0]), "value_variant": float(v[i, 1]),
                     "rank_imagenet": float(r[0, i]), "rank_variant": float(r[1, i]),
                     "rank_change": float(r[1, i] - r[0, i]),
                     "n_models": len(models)})
  return rows
