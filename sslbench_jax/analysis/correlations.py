"""Correlation tables across models: protocols, in-domain vs out-of-domain.

Columns compared are named ``"protocol/dataset"`` (e.g. ``"linear/cub"``);
``"protocol/mean_ood"`` is a model's arithmetic mean over the out-of-domain
datasets it has all of (models missing one get NaN, so that means are
comparable). ``"protocol/variants_weighted_mean"`` and
``"protocol/variants_geometric_mean"`` are the "benchmark lottery" aggregates
over ImageNet val and every ImageNet variant present (weights: test-set sizes,
``n_examples``), likewise NaN for a model missing one of them.

ImageNet val is compared with every variant (``p/imagenet`` vs
``p/imagenet_real`` ...) and with the two aggregates. Spearman and Kendall on
such a pair are the rank correlations of the val ranking with the variant's
ranking (ranks among the models that have both numbers, ties averaged;
Kendall tau-b).
"""

from __future__ import annotations

import numpy as np

from sslbench_jax.analysis import names
from sslbench_jax.analysis import stats
from sslbench_jax.analysis.table import ResultsTable

MEAN_OOD = "mean_ood"
# A model's weighted (by test-set size) / geometric mean over ImageNet val and
# every ImageNet variant present; NaN unless it has all of them.
VARIANTS_WMEAN = "variants_weighted_mean"
VARIANTS_GMEAN = "variants_geometric_mean"
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
  if dataset in (VARIANTS_WMEAN, VARIANTS_GMEAN):
    sets = _variant_suite(table)
    if not sets:
      return np.full(len(models), np.nan)
    v, n = table.matrix(protocol, sets, models)
    if dataset == VARIANTS_WMEAN:
      return (v * n).sum(axis=1) / n.sum(axis=1)  # NaN unless complete
    with np.errstate(divide="ignore"):
      return np.exp(np.log(v).mean(axis=1))  # a 0 accuracy gives 0
  if dataset == MEAN_OOD:
    ood = table.ood_datasets
    if not ood:
      return np.full(len(models), np.nan)
    v, _ = table.matrix(protocol, ood, models)
    return v.mean(axis=1)  # NaN unless complete
  v, _ = table.matrix(protocol, [dataset], models)
  return v[:, 0]


def _variant_suite(table: ResultsTable) -> list[str]:
  """ImageNet val + the variants present ([] without a variant)."""
  variants = variants_present(table)
  return ([names.IN_DOMAIN] if names.IN_DOMAIN in table.datasets else []) + variants \
      if variants else []


def variants_present(table: ResultsTable) -> list[str]:
  """The ImageNet evaluation variants in the results, ``names.VARIANTS`` order."""
  return [d for d in table.datasets if d in names.VARIANTS]


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
    ``q/mean_ood`` for every protocol q;
  * ImageNet val vs its variants: ``p/imagenet`` vs every ``p/<variant>``
    present and vs ``p/variants_weighted_mean`` / ``p/variants_geometric_mean``.
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
  if names.IN_DOMAIN in table.datasets and variants_present(table):
    for p in protos:
      for v in variants_present(table) + [VARIANTS_WMEAN, VARIANTS_GMEAN]:
        pairs.append((f"{p}/{names.IN_DOMAIN}", f"{p}/{v}"))
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
  backbone family is present, and for a protocol where it is undefined (fewer
  than 4 models of known backbone with both numbers).
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
    if not np.isfinite(res.r):
      continue  # too few models of known backbone (or constant residuals)
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
