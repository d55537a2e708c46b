"""Results table for analysis: long rows -> (model x dataset) matrices.

Input is the CSV export of the results store (columns ``model, dataset, split,
protocol, metric, value, n_examples`` at least; optional ``hparams``,
``backbone``, ``method_family``) or the ``.jsonl`` store itself. Dataset names
are canonicalised (``names.canonical_dataset``) and protocols labelled
``<name>+bn`` when the hparams ask for BatchNorm before the head (a trailing
``_bn`` of the name dropped, so the study config's ``linear_bn`` entry pairs
with ``linear``), unless BN on/off was a selected hyper-parameter of a sweep
(``bn_selected_protocols``).

Metric ``primary`` (``PRIMARY``) keeps, per measurement, its test set's main
metric, selected by ``results.store.primary_mask``: ``real_top1`` on ImageNet
ReaL (which has no single-label top1), ``subset_top1`` on ImageNet-R / -A
(their ``top1`` is the unrestricted 1000-way one), ``top1`` elsewhere. It works
on the store, its plain CSV export, and ``store.export_primary_csv`` files
(whose rows are already named ``primary``). With ``metric=None`` (the
``analyze`` / ``report`` default) ``resolve_metric`` picks ``primary`` when the
results hold ``real_top1`` / ``subset_top1`` (or ``primary``) rows and
``top1`` otherwise, so top1-only results are analysed exactly as before.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os

from absl import logging
import numpy as np

from sslbench_jax.analysis import names
from sslbench_jax.metrics import primary as primary_lib

REQUIRED_COLUMNS = ("model", "dataset", "split", "protocol", "metric", "value",
                    "n_examples")
# The per-test-set main metric (defined once, ``metrics.primary``).
PRIMARY = primary_lib.PRIMARY
# Metrics whose presence makes ``primary`` the automatic choice: without them
# every test set's primary metric is top1 and ``top1`` is kept as before.
_PRIMARY_ONLY_METRICS = primary_lib.SPECIFIC_METRICS + (PRIMARY,)


@dataclasses.dataclass
class ResultsTable:
  """Values of one metric, keyed by (model, protocol, dataset).

  Attributes:
    metric: the metric kept (e.g. ``"top1"``, or ``"primary"``: each test
      set's main metric, see the module docstring).
    values: {(model, protocol, dataset): value in percent}.
    n_examples: {(model, protocol, dataset): test-set size}.
    backbone: {model: "ResNet" | "ViT" | "unknown"}.
    method_family: {model: "discriminative" | "generative" | "unknown"}.
  """
  metric: str
  values: dict[tuple[str, str, str], float]
  n_examples: dict[tuple[str, str, str], int]
  backbone: dict[str, str]
  method_family: dict[str, str]

  @property
  def models(self) -> list[str]:
    return sorted({k[0] for k in self.values})

  @property
  def protocols(self) -> list[str]:
    return sorted({k[1] for k in self.values})

  @property
  def datasets(self) -> list[str]:
    """All datasets present, in-domain first, then benchmark, then variants."""
    present = {k[2] for k in self.values}
    order = [names.IN_DOMAIN] + sorted(present - {names.IN_DOMAIN} - set(names.VARIANTS))
    order += [v for v in names.VARIANTS if v in present]
    return [d for d in order if d in present]

  @property
  def benchmark_datasets(self) -> list[str]:
    """Datasets aggregated over: everything but the ImageNet val variants."""
    return [d for d in self.datasets if d not in names.VARIANTS]

  @property
  def ood_datasets(self) -> list[str]:
    """Out-of-domain datasets: benchmark datasets other than ImageNet."""
    return [d for d in self.benchmark_datasets if d != names.IN_DOMAIN]

  def matrix(self, protocol: str, datasets: list[str],
             models: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values, n_examples) as (n_models, n_datasets) arrays; NaN/0 if missing.

    Args:
      protocol: protocol label.
      datasets: canonical dataset keys (columns).
      models: rows (default: all models).

    Returns:
      Two float64 arrays.
    """
    models = self.models if models is None else models
    v = np.full((len(models), len(datasets)), np.nan)
    n = np.zeros((len(models), len(datasets)))
    for i, m in enumerate(models):
      for j, d in enumerate(datasets):
        key = (m, protocol, d)
        if key in self.values:
          v[i, j] = self.values[key]
          n[i, j] = self.n_examples[key]
    return v, n


def _read_csv(path: str) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"{path}: results CSV lacks columns {missing} "
                       f"(has {reader.fieldnames})")
    return list(reader)


def _read_store(path: str) -> list[dict[str, str]]:
  from sslbench_jax.results import store  # data flows store -> analysis
  rec = store.read_results(path)
  return [{k: str(r[k]) for k in rec.dtype.names} for r in rec]


def resolve_metric(rows: list[dict[str, str]], metric: str | None) -> str:
  """The metric to analyse: ``metric``, or the automatic choice when None.

  Args:
    rows: results rows (dicts with at least a ``metric`` key).
    metric: a metric name, or None for ``primary`` if any row's metric is
      ``real_top1``, ``subset_top1`` or ``primary``, else ``top1``.

  Returns:
    The metric name.
  """
  if metric is not None:
    return metric
  if any(r["metric"] in _PRIMARY_ONLY_METRICS for r in rows):
    return PRIMARY
  return "top1"


def load_results(path: str, metric: str | None = "top1") -> ResultsTable:
  """Reads a results CSV export (or ``.jsonl`` store) for one metric.

  Rows with the same (model, protocol label, canonical dataset) -- e.g. seeds
  -- are averaged (a warning says how many).

  Args:
    path: ``.csv`` export or ``.jsonl`` store.
    metric: metric to keep, e.g. ``"top1"``; ``"primary"`` keeps each test
      set's main metric (module docstring); None picks one (``resolve_metric``).

  Returns:
    A ``ResultsTable``.

  Raises:
    FileNotFoundError: ``path`` is missing.
    ValueError: required columns missing, bad numbers, or no row of ``metric``.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"results file not found: {path}")
  rows = _read_store(path) if path.endswith(".jsonl") else _read_csv(path)
  return table_from_rows(rows, metric, source=path)


def _primary_keep(rows: list[dict[str, str]]) -> list[bool]:
  """Which rows hold their measurement's primary metric (``store.primary_mask``).

  Rows already named ``primary`` (an ``export_primary_csv`` file) were
  selected when exported and are kept as they are; if there are any, the
  other rows are not considered (they would be the same measurements again).
  """
  if any(r["metric"] == PRIMARY for r in rows):
    return [r["metric"] == PRIMARY for r in rows]
  from sslbench_jax.results import store  # data flows store -> analysis
  # CSV files may leave out optional key columns; a measurement is then
  # identified by the columns present (missing ones take the store default).
  keyed = [{k: r.get(k, store.DEFAULTS.get(k, "")) for k in store.DEDUP_KEY}
           for r in rows]
  for k in keyed:
    k["hparams"] = _canonical_hparams(k["hparams"])
  return [bool(b) for b in store.primary_mask(keyed)]


def _canonical_hparams(hparams) -> str:
  """``hparams`` as sorted-key JSON, so that equal settings group together."""
  if not isinstance(hparams, str):
    return json.dumps(hparams, sort_keys=True)
  try:
    return json.dumps(json.loads(hparams) if hparams.strip() else {}, sort_keys=True)
  except json.JSONDecodeError:
    return hparams  # not JSON: compared as written


def bn_selected_protocols(rows: list[dict[str, str]]) -> set[str]:
  """Protocol names whose BatchNorm setting was picked by model selection.

  A linear sweep over ``batchnorm=[false, true]`` stores, per (model,
  dataset), the selected head: BN on for some models, off for others, never
  both for one measurement. Labelling those ``+bn`` would split one protocol
  into two half-filled ones. Separate runs with BN fixed on and off instead
  leave both settings on the same (model, dataset, metric) cell. So a name
  counts as BN-selected when its rows hold both settings but no cell holds
  both.

  Args:
    rows: results rows (``protocol``, ``hparams``, ``model``, ``dataset``,
      ``split``, ``metric``).

  Returns:
    The protocol names whose rows keep their name regardless of BN.
  """
  settings: dict[str, set[bool]] = collections.defaultdict(set)
  cells: dict[tuple, set[bool]] = collections.defaultdict(set)
  for r in rows:
    p = r["protocol"]
    bn = names.uses_batchnorm(p, r.get("hparams"))
    settings[p].add(bn)
    cells[(p, r["model"], r["dataset"], r.get("split", ""), r["metric"])].add(bn)
  both_in_a_cell = {k[0] for k, v in cells.items() if len(v) > 1}
  return {p for p, v in settings.items() if len(v) > 1 and p not in both_in_a_cell}


def table_from_rows(rows: list[dict[str, str]], metric: str | None = "top1",
                    source: str = "rows") -> ResultsTable:
  """Builds a ``ResultsTable`` from row dicts (see ``load_results``)."""
  metric = resolve_metric(rows, metric)
  bn_selected = bn_selected_protocols(rows)
  if bn_selected:
    logging.info("%s: BatchNorm was a selected hyper-parameter of %s (not split "
                 "into +bn protocols)", source, sorted(bn_selected))
  keep = (_primary_keep(rows) if metric == PRIMARY
          else [r["metric"] == metric for r in rows])
  acc: dict[tuple, list[tuple[float, int]]] = collections.defaultdict(list)
  backbone: dict[str, str] = {}
  family: dict[str, str] = {}
  metrics_seen = set()
  for i, (r, kept) in enumerate(zip(rows, keep)):
    metrics_seen.add(r["metric"])
    if not kept:
      continue
    try:
      value = float(r["value"])
      n = int(float(r["n_examples"]))
    except (TypeError, ValueError):
      raise ValueError(f"{source}: row {i + 1} has a non-numeric value/n_examples: "
                       f"{r.get('value')!r}, {r.get('n_examples')!r}") from None
    if not math.isfinite(value):
      raise ValueError(f"{source}: row {i + 1} value is {value}")
    model = r["model"]
    key = (model, names.protocol_label(r["protocol"], r.get("hparams"),
                                       r["protocol"] in bn_selected),
           names.canonical_dataset(r["dataset"], r.get("split", "")))
    acc[key].append((value, n))
    info = names.parse_model_name(model)
    backbone[model] = (r.get("backbone") or "").strip() or info.backbone
    family[model] = (r.get("method_family") or "").strip() or info.method_family
  if not acc:
    wanted = (f"metric {metric!r}" if metric != PRIMARY else
              f"a primary metric ({', '.join(primary_lib.PRIMARY_METRICS)})")
    raise ValueError(f"{source}: no rows with {wanted}; "
                     f"metrics present: {sorted(metrics_seen)}")
  values, n_examples = {}, {}
  averaged = 0
  for key, vals in acc.items():
    averaged += len(vals) > 1
    values[key] = float(np.mean([v for v, _ in vals]))
    n_examples[key] = int(round(np.mean([n for _, n in vals])))
  if averaged:
    logging.warning("%s: %d (model, protocol, dataset) cells had several rows "
                    "(seeds/hparams); their values were averaged", source, averaged)
  return ResultsTable(metric, values, n_examples, backbone, family)
