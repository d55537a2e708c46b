"""Correlation tables across models: protocols, in-domain vs out-of-domain.

Columns compared are named ``"protocol/dataset"`` (e.g. ``"linear/cub"``);
``"protocol/mean_ood"`` is a model's arithmetic mean over the out-of-domain
datasets it has all of (models missing one get NaN, so that means are
comparable).
"""

from __future__ import annotations

import numpy as np

from sslbench_jax.analysis import names
from sslbench_jax.analysis import stats
from sslbench_jax.analysis.table import ResultsTable

MEAN_OOD = "mean_ood"
CORRELATION_COLUMNS = ("x", "y", "method", "r", "ci_low", "ci_high", "p_value",
                       "n_models")
GROUPED_COLUMNS = ("group_by", "group") + CORRELATION_COLUMNS
PREDICTOR_COLUMNS = ("target", "predictor", "loo_rmse", "loo_mae", "n_models",
                     "best")
BN_COLUMNS = ("protocol", "dataset", "group", "mean_diff", "ci_low", "ci_high",
              "p_value", "n_models", "n_improved")


def column(table: ResultsTable, name: str, models: list[str] | None = None) -> np.ndarray:
  """Values of a ``"protocol/dataset"`` column per model (NaN if missing)."""
  models = table.models if models is None else models
  protocol, _, dataset = name.rpartition("/")
  if dataset == MEAN_OOD:
    ood = table.ood_datasets
    if not ood:
      return np.full(len(models), np.nan)
    v, _ = table.matrix(protocol, ood, models)
    return v.mean(axis=1)  # NaN unless complete
  v, _ = table.matrix(protocol, [dataset], models)
  return v[:, 0]


def all_columns(table: ResultsTable) -> list[str]:
  """Every ``protocol/dataset`` column with data, plus ``protocol/mean_ood``."""
  cols = []
  present = set(table.values)
  for p in table.protocols:
    for d in table.benchmark_datasets:
      if any((m, p, d) in present for m in table.models):
        cols.append(f"{p}/{d}")
    if table.ood_datasets:
      cols.append(f"{p}/{MEAN_OOD}")
  return cols


def default_pairs(table: ResultsTable) -> list[tuple[str, str]]:
  """The comparisons reported with intervals and p-values.

  * protocol vs protocol on each dataset (and on mean_ood);
  * in-domain vs out-of-domain: ``p/imagenet`` vs every ``p/<ood>`` and vs
    ``q/mean_ood`` for every protocol q.
  """
  protos = table.protocols
  datasets = table.benchmark_datasets + ([MEAN_OOD] if table.ood_datasets else [])
  pairs = []
  for d in datasets:
    for i, p in enumerate(protos):
      for q in protos[i + 1:]:
        pairs.append((f"{p}/{d}", f"{q}/{d}"))
  if names.IN_DOMAIN in table.benchmark_datasets:
    for p in protos:
      for d in table.ood_datasets:
        pairs.append((f"{p}/{names.IN_DOMAIN}", f"{p}/{d}"))
      for q in protos:
        if table.ood_datasets:
          pairs.append((f"{p}/{names.IN_DOMAIN}", f"{q}/{MEAN_OOD}"))
  seen, out = set(), []
  for pair in pairs:
    if pair not in seen:
      seen.add(pair)
      out.append(pair)
  return out


def correlation_table(table: ResultsTable, pairs: list[tuple[str, str]] | None = None,
                      methods=stats.METHODS, n_boot: int = 2000, n_perm: int = 2000,
                      seed: int = 0, models: list[str] | None = None) -> list[dict]:
  """Correlations across models for each (x, y) column pair and method.

  Args:
    table: the results.
    pairs: column pairs (default ``default_pairs``).
    methods: subset of ``stats.METHODS``.
    n_boot, n_perm, seed: resampling (see ``stats.correlate``; every pair uses
      the same seed, so rows are reproducible one by one).
    models: restrict to these models (default all).

  Returns:
    Rows with ``CORRELATION_COLUMNS``.
  """
  pairs = default_pairs(table) if pairs is None else pairs
  rows = []
  for x, y in pairs:
    xv, yv = column(table, x, models), column(table, y, models)
    for method in methods:
      res = stats.correlate(xv, yv, method, n_boot, n_perm, seed)
      rows.append({"x": x, "y": y, "method": method, "r": res.r,
                   "ci_low": res.ci_low, "ci_high": res.ci_high,
                   "p_value": res.p_value, "n_models": res.n})
  return rows


def backbone_indicator(table: ResultsTable, models: list[str]) -> np.ndarray:
  """1.0 for ViT, 0.0 for ResNet, NaN for unknown backbones."""
  lookup = {"ViT": 1.0, "ResNet": 0.0}
  return np.array([lookup.get(table.backbone.get(m), np.nan) for m in models])


def partial_table(table: ResultsTable, n_boot: int = 2000, n_perm: int = 2000,
                  seed: int = 0) -> list[dict]:
  """In-domain vs mean OOD per protocol, Pearson partialling out the backbone.

  Both columns are residualised on a ViT/ResNet indicator (with intercept);
  ``method`` is ``"pearson_partial_backbone"``. Skipped when only one
  backbone family is present.
  """
  models = table.models
  z = backbone_indicator(table, models)
  if np.all(np.isnan(z)) or np.nanmin(z) == np.nanmax(z):
    return []
  rows = []
  if names.IN_DOMAIN not in table.benchmark_datasets or not table.ood_datasets:
    return rows
  for p in table.protocols:
    x, y = f"{p}/{names.IN_DOMAIN}", f"{p}/{MEAN_OOD}"
    res = stats.partial_correlation(column(table, x), column(table, y), z,
                                    n_boot, n_perm, seed)
    rows.append({"x": x, "y": y, "method": "pearson_partial_backbone",
                 "r": res.r, "ci_low": res.ci_low, "ci_high": res.ci_high,
                 "p_value": res.p_value, "n_models": res.n})
  return rows


def grouped_table(table: ResultsTable, n_boot: int = 2000, n_perm: int = 2000,
                  seed: int = 0, methods=stats.METHODS) -> list[dict]:
  """In-domain vs mean OOD correlations within backbone and method families.

  Returns:
    Rows with ``GROUPED_COLUMNS`` (``group_by`` "backbone"/"method_family").
  """
  if names.IN_DOMAIN not in table.benchmark_datasets or not table.ood_datasets:
    return []
  rows = []
  for group_by, mapping in (("backbone", table.backbone),
                            ("method_family", table.method_family)):
    for group in sorted(set(mapping.values()) - {names.UNKNOWN}):
      members = [m for m in table.models if mapping.get(m) == group]
      pairs = [(f"{p}/{names.IN_DOMAIN}", f"{p}/{MEAN_OOD}") for p in table.protocols]
      for row in correlation_table(table, pairs, methods, n_boot, n_perm, seed,
                                   models=members):
        rows.append({"group_by": group_by, "group": group, **row})
  return rows


def correlation_matrix(table: ResultsTable, method: str = "spearman") -> tuple[list[str], np.ndarray]:
  """Pairwise-complete correlation matrix between all columns (no resampling).

  Returns:
    (column names, (C, C) matrix).
  """
  cols = all_columns(table)
  data = [column(table, c) for c in cols]
  mat = np.full((len(cols), len(cols)), np.nan)
  for i in range(len(cols)):
    for j in range(i, len(cols)):
      r = stats.correlate(data[i], data[j], method, n_boot=0, n_perm=0).r
      mat[i, j] = mat[j, i] = r
  return cols, mat


def predictor_table(table: ResultsTable) -> list[dict]:
  """Which in-domain protocol best predicts mean out-of-domain accuracy.

  For every target protocol q and predictor protocol p: leave-one-model-out
  error of the line ``q/mean_ood ~ a + b * p/imagenet``. ``best`` marks the
  predictor with the lowest LOO RMSE for each target.

  Returns:
    Rows with ``PREDICTOR_COLUMNS``.
  """
  if names.IN_DOMAIN not in table.benchmark_datasets or not table.ood_datasets:
    return []
  rows = []
  for q in table.protocols:
    target = f"{q}/{MEAN_OOD}"
    block = []
    for p in table.protocols:
      pred = f"{p}/{names.IN_DOMAIN}"
      fit = stats.loo_linear_error(column(table, pred), column(table, target))
      block.append({"target": target, "predictor": pred, "loo_rmse": fit.rmse,
                    "loo_mae": fit.mae, "n_models": fit.n, "best": False})
    finite = [r for r in block if np.isfinite(r["loo_rmse"])]
    if finite:
      min(finite, key=lambda r: r["loo_rmse"])["best"] = True
    rows += block
  return rows


def bn_effect_table(table: ResultsTable, n_boot: int = 2000, n_perm: int = 2000,
                    seed: int = 0) -> list[dict]:
  """Paired effect of BatchNorm before the head: ``p+bn`` minus ``p``.

  Per dataset and on mean_ood; for all models and within each backbone family.

  Returns:
    Rows with ``BN_COLUMNS`` (``mean_diff`` in accuracy points).
  """
  rows = []
  for p in table.protocols:
    if not p.endswith("+bn") or p[:-3] not in table.protocols:
      continue
    base = p[:-3]
    groups = [("all", table.models)]
    for fam in sorted(set(table.backbone.values()) - {names.UNKNOWN}):
      groups.append((fam, [m for m in table.models if table.backbone.get(m) == fam]))
    datasets = table.benchmark_datasets + ([MEAN_OOD] if table.ood_datasets else [])
    for d in datasets:
      for group, members in groups:
        a = column(table, f"{base}/{d}", members)
        b = column(table, f"{p}/{d}", members)
        res = stats.paired_difference(a, b, n_boot, n_perm, seed)
        if res.n == 0:
          continue
        rows.append({"protocol": base, "dataset": d, "group": group,
                     "mean_diff": res.mean_diff, "ci_low": res.ci_low,
                     "ci_high": res.ci_high, "p_value": res.p_value,
                     "n_models": res.n, "n_improved": res.n_positive})
  return rows
