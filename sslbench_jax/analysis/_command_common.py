"""Flags and the shared body of the ``analyze`` and ``report`` subcommands."""

from __future__ import annotations

import os

from absl import flags
from absl import logging

from sslbench_jax.analysis import report
from sslbench_jax.analysis import summary
from sslbench_jax.analysis import table as table_lib


def define_flags() -> None:
  """Defines the flags both subcommands take."""
  flags.DEFINE_string("results", None, "results CSV export (or .jsonl store)",
                      required=True)
  flags.DEFINE_string("out", None, "output directory", required=True)
  flags.DEFINE_string("metric", "top1", "metric to analyse")
  flags.DEFINE_integer("n_boot", 2000, "bootstrap resamples per interval", lower_bound=0)
  flags.DEFINE_integer("n_perm", 2000, "permutations per p-value", lower_bound=0)
  flags.DEFINE_integer("seed", 0, "resampling seed")
  flags.DEFINE_enum("matrix_method", "spearman", ["pearson", "spearman", "kendall"],
                    "correlation of the full matrix / heatmap")


def run(html_too: bool) -> dict[str, str]:
  """Loads ``--results``, analyses, writes tables, plots and the report."""
  f = flags.FLAGS
  tab = table_lib.load_results(f.results, f.metric)
  a = summary.analyze(tab, f.n_boot, f.n_perm, f.seed, f.matrix_method)
  out = summary.write_tables(a, f.out)
  out.update(report.write_report(a, f.out, source=os.path.abspath(f.results),
                                 html_too=html_too))
  logging.info("wrote %d files to %s", len(out), f.out)
  print(f"wrote {len(out)} files to {f.out} (report: {out['report.md']})")
  return out
