"""``sslbench-jax report --results FILE --out DIR``: Markdown + HTML report.

Same analysis as ``analyze`` (all its CSV files too), plus ``report.html``.
FILE is the CSV export or the ``.jsonl`` results store.
"""

from __future__ import annotations

from absl import app

from sslbench_jax.analysis import _command_common

_NAME = "report"


def define_flags() -> None:
  """Defines this subcommand's absl flags."""
  _command_common.define_flags()


def main(argv: list[str]) -> None:
  """Runs the subcommand (argv: leftover positional arguments)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    _command_common.run(html_too=True)
  except (FileNotFoundError, ValueError) as e:
    # Bad input: one clear line on stderr, exit status 1, no traceback.
    raise SystemExit(f"sslbench-jax {_NAME}: error: {e}") from None
