"""Flags and the shared body of the ``analyze`` and ``report`` subcommands."""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging

from sslbench_jax.analysis import report
from sslbench_jax.analysis import summary
from sslbench_jax.analysis import table as table_lib
from sslbench_jax.metrics import primary as primary_lib


def define_flags() -> None:
  """Defines the flags both subcommands take."""
  flags.DEFINE_string("results", None, "results CSV export (or .jsonl store)",
                      required=True)
  flags.DEFINE_string("out", None, "output directory", required=True)
  flags.DEFINE_string(
      "metric", None,
      "metric to analyse, e.g. top1 or top5; 'primary' = each test set's main "
      f"metric ({primary_lib.DESCRIPTION}; rows chosen like "
      "results.store.primary_mask). Default: primary if the results hold "
      f"{'/'.join(primary_lib.SPECIFIC_METRICS)} rows, else top1")
  flags.DEFINE_integer("n_boot", 2000, "bootstrap resamples per interval", lower_bound=0)
  flags.DEFINE_integer("n_perm", 2000, "permutations per p-value", lower_bound=0)
  flags.DEFINE_integer("seed", 0, "resampling seed")
  flags.DEFINE_enum("matrix_method", "spearman", ["pearson", "spearman", "kendall"],
                    "correlation of the full matrix / heatmap")


def make_main(name: str, html_too: bool):
  """The ``main(argv)`` of the ``analyze`` (html_too=False) / ``report`` subcommand."""

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
      run(html_too=html_too)
    except (FileNotFoundError, ValueError) as e:
      # Bad input: one clear line on stderr, exit status 1, no traceback.
      raise SystemExit(f"sslbench-jax {name}: error: {e}") from None

  return main


def run(html_too: bool) -> dict[str, str]:
  """Runs ``write_all`` with the flag values."""
  f = flags.FLAGS
  out = write_all(f.results, f.out, metric=f.metric, n_boot=f.n_boot, n_perm=f.n_perm,
                  seed=f.seed, matrix_method=f.matrix_method, html_too=html_too)
  print(f"wrote {len(out)} files to {f.out} (report: {out['report.md']})")
  return out


def write_all(results: str, out_dir: str, *, metric: str | None = None, n_boot: int = 2000,
              n_perm: int = 2000, seed: int = 0, matrix_method: str = "spearman",
              html_too: bool = True) -> dict[str, str]:
  """Loads ``results``, analyses, writes tables, plots and the report.

  Args:
    results: results CSV export or ``.jsonl`` store.
    out_dir: output directory.
    metric: metric analysed; None: ``primary`` when the results hold
      ``real_top1`` / ``subset_top1`` rows, else ``top1``
      (``table.resolve_metric``).
    n_boot: bootstrap resamples per interval.
    n_perm: permutations per p-value.
    seed: resampling seed.
    matrix_method: correlation of the full matrix / heatmap.
    html_too: also write ``report.html``.

  Returns:
    Output file name -> path.
  """
  tab = table_lib.load_results(results, metric)
  logging.info("analysing metric %r of %s", tab.metric, results)
  a = summary.analyze(tab, n_boot, n_perm, seed, matrix_method)
  out = summary.write_tables(a, out_dir)
  out.update(report.write_report(a, out_dir, source=os.path.abspath(results),
                                 html_too=html_too))
  logging.info("wrote %d files to %s", len(out), out_dir)
  return out
