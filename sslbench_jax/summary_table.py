"""A one-screen text table of a results CSV: (dataset, protocol) x model, top-1 %.

``sslbench-jax evaluate`` prints it at the end of a run, under the path of the
report, so the first thing a user sees is the comparison the run made.
"""

from __future__ import annotations

import csv
import math


def _read(path: str, metric: str) -> tuple[list[str], list[tuple[str, str]],
                                           dict[tuple[str, str, str], float]]:
  models: list[str] = []
  rows: list[tuple[str, str]] = []
  values: dict[tuple[str, str, str], float] = {}
  with open(path, newline="", encoding="utf-8") as f:
    for r in csv.DictReader(f):
      # Few-shot rows hold the mean over tries as "<metric>_mean".
      if r["metric"] not in (metric, f"{metric}_mean"):
        continue
      if r["model"] not in models:
        models.append(r["model"])
      key = (r["dataset"], r["protocol"])
      if key not in rows:
        rows.append(key)
      values[r["dataset"], r["protocol"], r["model"]] = float(r["value"])
  return models, rows, values


def format_table(results_csv: str, metric: str = "top1") -> str:
  """The table of ``metric`` in ``results_csv`` (written by ``results.store.export_csv``).

  Models are numbered columns (``[1]``, ``[2]``, ...) named in a legend above
  the table, so that long model names keep it narrow; rows are (dataset,
  protocol), grouped by dataset, in the order the results first mention
  them (few-shot rows show the mean over tries, ``<metric>_mean``); ``-``
  where a model has no number (e.g. the classifier head, run for one model
  only).

  Args:
    results_csv: the results CSV.
    metric: the metric to show (rows of other metrics are ignored).

  Returns:
    The table as text (no trailing newline); a one-line message when there
    is no row of ``metric``.
  """
  models, rows, values = _read(results_csv, metric)
  if not rows:
    return f"(no {metric} results in {results_csv})"
  datasets = list(dict.fromkeys(d for d, _ in rows))
  rows = sorted(rows, key=lambda r: datasets.index(r[0]))  # grouped by dataset
  lines = [f"{metric} (%) by model:"]
  lines += [f"  [{i}] {m}" for i, m in enumerate(models, start=1)]
  labels = [f"{d} / {p}" for d, p in rows]
  width = max(len(l) for l in labels + ["dataset / protocol"])
  head = "  ".join(f"{f'[{i}]':>6}" for i in range(1, len(models) + 1))
  lines.append(f"{'dataset / protocol':<{width}}  {head}")
  lines.append("-" * (width + 2 + len(head)))
  for label, (d, p) in zip(labels, rows):
    cells = []
    for m in models:
      v = values.get((d, p, m))
      cells.append(f"{v:6.1f}" if v is not None and math.isfinite(v) else f"{'-':>6}")
    lines.append(f"{label:<{width}}  " + "  ".join(cells))
  return "\n".join(lines)
