"""Everything the analysis computes from one results table, and its CSV files."""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import numpy as np

from sslbench_jax import atomic

from sslbench_jax.analysis import aggregates
from sslbench_jax.analysis import baselines
from sslbench_jax.analysis import correlations
from sslbench_jax.analysis import stats
from sslbench_jax.analysis.table import ResultsTable


@dataclasses.dataclass
class Analysis:
  """All tables (lists of row dicts) plus the correlation matrix."""
  table: ResultsTable
  aggregates: list[dict]
  correlations: list[dict]
  grouped: list[dict]
  predictors: list[dict]
  bn_effect: list[dict]
  rank_changes: list[dict]
  comparison: list[dict]
  matrix_columns: list[str]
  matrices: dict[str, np.ndarray]  # method -> (C, C)
  matrix_method: str               # the one drawn as heatmap

  @property
  def matrix(self) -> np.ndarray:
    return self.matrices[self.matrix_method]
  n_boot: int
  n_perm: int
  seed: int


def analyze(table: ResultsTable, n_boot: int = 2000, n_perm: int = 2000,
            seed: int = 0, matrix_method: str = "spearman") -> Analysis:
  """Runs every analysis on ``table``.

  Args:
    table: the results.
    n_boot: bootstrap resamples per interval.
    n_perm: permutations per p-value.
    seed: resampling seed.
    matrix_method: correlation used for the full matrix / heatmap.

  Returns:
    An ``Analysis``.
  """
  corr = correlations.correlation_table(table, n_boot=n_boot, n_perm=n_perm, seed=seed)
  corr += correlations.partial_table(table, n_boot, n_perm, seed)
  matrices = {}
  for method in stats.METHODS:
    cols, matrices[method] = correlations.correlation_matrix(table, method)
  return Analysis(
      table=table,
      aggregates=aggregates.aggregates(table),
      correlations=corr,
      grouped=correlations.grouped_table(table, n_boot, n_perm, seed),
      predictors=correlations.predictor_table(table),
      bn_effect=correlations.bn_effect_table(table, n_boot, n_perm, seed),
      rank_changes=aggregates.rank_changes(table),
      comparison=baselines.compare(table),
      matrix_columns=cols, matrices=matrices, matrix_method=matrix_method,
      n_boot=n_boot, n_perm=n_perm, seed=seed)


def _cell(v) -> str:
  if isinstance(v, (bool, np.bool_)):
    return str(bool(v))
  if isinstance(v, (float, np.floating)):
    return "" if math.isnan(v) else repr(float(v))
  return str(v)


def write_csv(path: str, rows: list[dict], columns) -> str:
  """Writes ``rows`` with ``columns`` as CSV, atomically (NaN -> empty)."""
  with atomic.atomic_open(path, "w", newline="", suffix=".csv") as f:
    w = csv.writer(f)
    w.writerow(columns)
    for r in rows:
      w.writerow([_cell(r[c]) for c in columns])
  return path


def write_tables(a: Analysis, out_dir: str) -> dict[str, str]:
  """Writes every table as CSV into ``out_dir``.

  Returns:
    {table name: path}.
  """
  files = {
      "aggregates": (a.aggregates, aggregates.AGGREGATE_COLUMNS),
      "correlations": (a.correlations, correlations.CORRELATION_COLUMNS),
      "correlations_grouped": (a.grouped, correlations.GROUPED_COLUMNS),
      "predictors": (a.predictors, correlations.PREDICTOR_COLUMNS),
      "bn_effect": (a.bn_effect, correlations.BN_COLUMNS),
      "rank_changes": (a.rank_changes, aggregates.RANK_CHANGE_COLUMNS),
      "published_comparison": (a.comparison, baselines.COMPARISON_COLUMNS),
  }
  out = {name: write_csv(os.path.join(out_dir, f"{name}.csv"), rows, cols)
         for name, (rows, cols) in files.items()}
  for method, mat in a.matrices.items():
    matrix_rows = [{"column": c, **{c2: mat[i, j] for j, c2 in enumerate(a.matrix_columns)}}
                   for i, c in enumerate(a.matrix_columns)]
    name = f"correlation_matrix_{method}"
    out[name] = write_csv(os.path.join(out_dir, f"{name}.csv"), matrix_rows,
                          ["column"] + a.matrix_columns)
  return out
