"""``sslbench-jax analyze --results FILE.csv --out DIR``.

Writes ``aggregates.csv``, ``correlations.csv``, ``correlations_grouped.csv``,
``correlation_matrix_{pearson,spearman,kendall}.csv``, ``predictors.csv``, ``bn_effect.csv``,
``rank_changes.csv``, ``published_comparison.csv``, ``plots/*.png`` and
``report.md`` into DIR.
"""

from __future__ import annotations

from sslbench_jax.analysis import _command_common

define_flags = _command_common.define_flags
main = _command_common.make_main("analyze", html_too=False)
