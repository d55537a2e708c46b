"""``sslbench-jax analyze --results FILE.csv --out DIR``.

Writes ``aggregates.csv``, ``correlations.csv``, ``correlations_grouped.csv``,
``correlation_matrix_{pearson,spearman,kendall}.csv``, ``predictors.csv``, ``bn_effect.csv``,
``rank_changes.csv``, ``published_comparison.csv``, ``plots/*.png`` and
``report.md`` into DIR.
"""

from __future__ import annotations

from absl import app

from sslbench_jax.analysis import _command_common

_NAME = "analyze"


def define_flags() -> None:
  """Defines this subcommand's absl flags."""
  _command_common.define_flags()


def main(argv: list[str]) -> None:
  """Runs the subcommand (argv: leftover positional arguments)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    _command_common.run(html_too=False)
  except (FileNotFoundError, ValueError) as e:
    # Bad input: one clear line on stderr, exit status 1, no traceback.
    raise SystemExit(f"sslbench-jax {_NAME}: error: {e}") from None
