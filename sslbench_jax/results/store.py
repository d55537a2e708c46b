"""The results store: one long-format JSON-lines table, appended atomically.

One row per (model, checkpoint_sha256, dataset, split, protocol, hparams,
metric, seed) measurement with its ``value``, ``n_examples``, ``device_count``,
``versions`` and ``timestamp``. Accuracy metrics are stored in percent
(0..100).

Concurrency: ``append_results`` serialises all rows of one call into complete
lines and writes them with one ``os.write`` loop on an ``O_APPEND`` descriptor
held under an exclusive ``fcntl.flock``. Several processes can append to the
same file; a writer killed mid-write can at worst leave a truncated last line,
which ``read_results`` skips with a warning (and the next append starts on a
fresh line so later rows stay intact).

Re-running a measurement appends a new row; ``read_results`` keeps the latest
row per key (``DEDUP_KEY``) unless ``deduplicate=False``.

Rows written by ``sslbench-jax evaluate`` also carry ``step`` (the
``model/protocol/dataset`` step of its workdir) and ``run_id`` (the run that
computed them, ``DIR/configs/<run_id>.json``); ``remove_rows`` lets it drop
the rows of a step that is recomputed or was not marked finished (see
``evaluate``), rewriting the file atomically under the same lock appenders
take, so no appended row is lost. Rows without a step (``probe --results``)
are never removed by it.
"""

from __future__ import annotations

import csv
import datetime
import fcntl
import importlib.metadata
import json
import math
import os
import warnings
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

from sslbench_jax import atomic
from sslbench_jax.metrics import primary as primary_lib

REQUIRED = ("model", "dataset", "split", "protocol", "metric", "value",
            "n_examples")
# Optional keys and the value stored when a row leaves them out.
DEFAULTS: dict[str, Any] = {
    "checkpoint_sha256": "",
    "hparams": {},
    "seed": -1,           # -1: not applicable / unknown
    "device_count": -1,   # -1: unknown
    "step": "",           # evaluate's step key; "" for rows of other writers
    "run_id": "",         # the evaluate run that wrote the row
}
AUTO = ("versions", "timestamp")
COLUMNS = ("model", "checkpoint_sha256", "dataset", "split", "protocol",
           "hparams", "metric", "value", "n_examples", "seed", "device_count",
           "versions", "timestamp", "step", "run_id")
# Two rows with equal key are the same measurement (a re-run).
DEDUP_KEY = ("model", "checkpoint_sha256", "dataset", "split", "protocol",
             "hparams", "metric", "seed")
# Metrics whose values must be percentages.
_PERCENT_PREFIXES = ("top", "real", "subset", "mean_per_class", "acc")
# What a measurement (its rows without the metric) is compared by: its primary
# metric, defined once in ``metrics.primary`` (real_top1 on ImageNet ReaL,
# subset_top1 on ImageNet-R / -A, top1 elsewhere).
PRIMARY_METRICS = primary_lib.PRIMARY_METRICS
PRIMARY = primary_lib.PRIMARY

_STR = ("model", "checkpoint_sha256", "dataset", "split", "protocol", "metric",
        "hparams", "versions", "timestamp", "step", "run_id")
_INT = ("n_examples", "seed", "device_count")


class ResultsStoreWarning(UserWarning):
  """A corrupt or truncated line was skipped while reading a store."""


def _versions() -> str:
  out = {}
  for pkg in ("jax", "flax", "numpy", "sslbench_jax"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = "unknown"
  return json.dumps(out, sort_keys=True)


def _canonical_json(value: Any, what: str) -> str:
  if isinstance(value, str):
    try:
      value = json.loads(value) if value else {}
    except json.JSONDecodeError:
      raise ValueError(f"{what} is not valid JSON: {value!r}") from None
  try:
    return json.dumps(value, sort_keys=True, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what} is not JSON-serialisable: {e}") from None


def normalize_row(row: dict[str, Any], index: int = 0) -> dict[str, Any]:
  """Validates one row and returns it with defaults, types and JSON canonical.

  Args:
    row: a dict with at least ``REQUIRED`` keys.
    index: position of the row in its batch (for error messages).

  Returns:
    A new dict with exactly ``COLUMNS`` keys.

  Raises:
    ValueError: on missing/unknown keys, NaN/inf or out-of-range values.
  """
  where = f"results row {index}"
  missing = [k for k in REQUIRED if k not in row]
  if missing:
    raise ValueError(f"{where} is missing required keys {missing}")
  unknown = sorted(set(row) - set(COLUMNS))
  if unknown:
    raise ValueError(f"{where} has unknown keys {unknown}; valid: {list(COLUMNS)}")
  out = {**DEFAULTS, **row}
  try:
    value = float(out["value"])
  except (TypeError, ValueError):
    raise ValueError(f"{where}: value {out['value']!r} is not a number") from None
  if not math.isfinite(value):
    raise ValueError(f"{where}: value is {value} for metric {out['metric']!r} "
                     f"of model {out['model']!r} (NaN/inf not allowed)")
  metric = str(out["metric"])
  if metric.startswith(_PERCENT_PREFIXES) and not 0.0 <= value <= 100.0:
    raise ValueError(f"{where}: accuracy {metric!r}={value} is not a percentage "
                     "in [0, 100]")
  out["value"] = value
  for k in _INT:
    try:
      out[k] = int(out[k])
    except (TypeError, ValueError):
      raise ValueError(f"{where}: {k}={out[k]!r} is not an integer") from None
  if out["n_examples"] < 0:
    raise ValueError(f"{where}: n_examples must be >= 0, got {out['n_examples']}")
  out["hparams"] = _canonical_json(out["hparams"], f"{where} hparams")
  if out.get("versions") is None:
    out["versions"] = _versions()
  else:
    out["versions"] = _canonical_json(out["versions"], f"{where} versions")
  if out.get("timestamp") is None:
    out["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="microseconds")
  for k in ("model", "checkpoint_sha256", "dataset", "split", "protocol",
            "metric", "timestamp", "step", "run_id"):
    out[k] = str(out[k])
    if "\n" in out[k]:
      raise ValueError(f"{where}: {k} contains a newline")
  for k in ("model", "dataset", "split", "protocol", "metric"):
    if not out[k]:
      raise ValueError(f"{where}: {k} is empty")
  return {k: out[k] for k in COLUMNS}


def append_results(path: str, rows: list[dict[str, Any]]) -> None:
  """Appends rows to the JSON-lines store at ``path`` (created if absent).

  All rows are validated first (nothing is written if one is bad), then written
  as complete lines in one locked append.

  Args:
    path: the ``.jsonl`` store.
    rows: dicts with ``REQUIRED`` keys and optionally the other ``COLUMNS``;
      ``versions`` (jax/flax/numpy/sslbench_jax) and ``timestamp`` (UTC ISO
      8601) are filled in when absent.

  Raises:
    ValueError: a row is invalid (the message names the row and key).
  """
  lines = [json.dumps(normalize_row(r, i), sort_keys=True, allow_nan=False)
           for i, r in enumerate(rows)]
  if not lines:
    return
  data = ("\n".join(lines) + "\n").encode("utf-8")
  try:
    with _locked(path, os.O_RDWR | os.O_APPEND | os.O_CREAT) as fd:
      # A writer killed earlier may have left a line without its newline:
      # start on a fresh line so that our rows stay parseable.
      size = os.fstat(fd).st_size
      if size and os.pread(fd, 1, size - 1) != b"\n":
        data = b"\n" + data
      view = memoryview(data)
      while view:
        written = os.write(fd, view)
        view = view[written:]
      os.fsync(fd)
  except OSError as e:
    raise _with_path(e, path) from None


def _with_path(e: OSError, path: str) -> OSError:
  """``e`` naming ``path`` (``os.write`` errors such as ENOSPC name no file)."""
  if e.filename is not None:
    return e
  return type(e)(e.errno, e.strerror, path)


class _locked:  # pylint: disable=invalid-name
  """``with _locked(path, flags) as fd``: ``path`` opened and exclusively flock-ed.

  ``remove_rows`` replaces the file by a new one (a new inode) while holding
  the lock on the old one, so a writer that waited on the old inode's lock
  re-opens the path and locks again until it holds the current file.
  """

  def __init__(self, path: str, flags: int):
    self.path, self.flags, self.fd = path, flags, -1

  def __enter__(self) -> int:
    directory = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(directory, exist_ok=True)
    while True:
      fd = os.open(self.path, self.flags, 0o644)
      fcntl.flock(fd, fcntl.LOCK_EX)
      try:
        current = os.stat(self.path).st_ino
      except FileNotFoundError:
        current = None
      if current == os.fstat(fd).st_ino:
        self.fd = fd
        return fd
      os.close(fd)  # replaced while we waited: lock the new file

  def __exit__(self, *exc) -> None:
    fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)


def remove_rows(path: str, drop: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
  """Removes the rows for which ``drop(row)`` is true; returns them.

  The file is rewritten atomically (a unique temporary file renamed over it)
  under the appenders' lock; lines that do not parse are kept as they are.
  Nothing is written when no row is dropped or the store does not exist.

  Args:
    path: the ``.jsonl`` store.
    drop: called with each normalised row.

  Returns:
    The dropped rows (normalised).
  """
  if not os.path.exists(path):
    return []
  try:
    with _locked(path, os.O_RDWR) as fd:
      raw = b""
      while chunk := os.read(fd, 1 << 20):
        raw += chunk
      kept, dropped = [], []
      for line in raw.split(b"\n"):
        if not line.strip():
          continue
        try:
          row = normalize_row(json.loads(line))
        except (ValueError, TypeError, AttributeError):
          kept.append(line)  # not a row: read_results reports it, we keep it
          continue
        if drop(row):
          dropped.append(row)
        else:
          kept.append(line)
      if dropped:
        atomic.write_bytes(path, b"".join(l + b"\n" for l in kept), prefix=".tmp-store-")
  except OSError as e:
    raise _with_path(e, path) from None
  return dropped


def _read_rows(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"results store not found: {path}")
  with open(path, "rb") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_SH)
    try:
      raw = f.read()
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)
  lines = raw.split(b"\n")
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    last = number == len(lines)  # no newline after it: possibly cut short
    try:
      row = json.loads(line)
      if not isinstance(row, dict):
        raise ValueError("not an object")
      rows.append(normalize_row(row, number))
    except ValueError as e:
      msg = (f"{path}:{number}: " +
             ("truncated trailing line ignored (an interrupted append?)"
              if last else f"corrupt line skipped ({e})"))
      logging.warning(msg)
      warnings.warn(msg, ResultsStoreWarning, stacklevel=3)
  return rows


def _dedup(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  latest: dict[tuple, tuple[str, int]] = {}
  for i, r in enumerate(rows):
    key = tuple(r[k] for k in DEDUP_KEY)
    # ISO-8601 UTC strings sort chronologically; file order breaks ties.
    if key not in latest or (r["timestamp"], i) >= latest[key]:
      latest[key] = (r["timestamp"], i)
  keep = sorted(i for _, i in latest.values())
  return [rows[i] for i in keep]


def to_records(rows: Sequence[dict[str, Any]]) -> np.recarray:
  """Normalised row dicts -> a NumPy record array with ``COLUMNS`` fields."""
  arrays = []
  for k in COLUMNS:
    col = [r[k] for r in rows]
    if k == "value":
      arrays.append(np.asarray(col, np.float64))
    elif k in _INT:
      arrays.append(np.asarray(col, np.int64))
    else:
      width = max([len(c) for c in col] + [1])
      arrays.append(np.asarray(col, f"<U{width}"))
  return np.rec.fromarrays(arrays, names=list(COLUMNS))


def read_results(path: str, deduplicate: bool = True) -> np.recarray:
  """Reads the store into a record array (pandas-free).

  Args:
    path: the ``.jsonl`` store.
    deduplicate: keep only the latest row per ``DEDUP_KEY``.

  Returns:
    ``np.recarray`` with fields ``COLUMNS`` (``value`` float64; ``n_examples``,
    ``seed``, ``device_count`` int64; the rest unicode strings).

  Raises:
    FileNotFoundError: ``path`` does not exist.
  """
  rows = _read_rows(path)
  return to_records(_dedup(rows) if deduplicate else rows)


def find_duplicates(records: np.ndarray) -> list[tuple[str, ...]]:
  """Keys (``DEDUP_KEY`` tuples) that occur more than once in ``records``."""
  counts: dict[tuple, int] = {}
  for r in records:
    key = tuple(str(r[k]) for k in DEDUP_KEY)
    counts[key] = counts.get(key, 0) + 1
  return [k for k, c in counts.items() if c > 1]


EXPORT_COLUMNS = ("model", "dataset", "split", "protocol", "metric", "value",
                  "n_examples", "checkpoint_sha256", "hparams", "seed",
                  "device_count", "timestamp", "versions", "step", "run_id")


def export_csv(path: str, out_csv: str, deduplicate: bool = True) -> int:
  """Writes the store as CSV (values in percent for accuracies).

  Args:
    path: the ``.jsonl`` store.
    out_csv: output CSV path (written atomically).
    deduplicate: keep only the latest row per key.

  Returns:
    The number of data rows written.
  """
  return _write_csv(read_results(path, deduplicate), out_csv)


def primary_mask(records: np.ndarray) -> np.ndarray:
  """Which rows hold their measurement's primary metric (``PRIMARY_METRICS``).

  Args:
    records: rows as from ``read_results`` (deduplicated, or the same
      measurement's rows would compete).

  Returns:
    (N,) bool; False for rows of measurements with none of ``PRIMARY_METRICS``
    (e.g. few-shot ``top1_mean``).
  """
  cell_keys = [k for k in DEDUP_KEY if k != "metric"]
  present: dict[tuple, set[str]] = {}
  cells = [tuple(str(r[k]) for k in cell_keys) for r in records]
  for cell, r in zip(cells, records):
    present.setdefault(cell, set()).add(str(r["metric"]))
  primary = {cell: primary_lib.primary_metric(metrics)
             for cell, metrics in present.items()}
  return np.asarray([str(r["metric"]) == primary[cell]
                     for cell, r in zip(cells, records)], bool).reshape(len(cells))


def export_primary_csv(path: str, out_csv: str) -> int:
  """Writes one row per measurement, its primary metric, as metric ``primary``.

  The analysis compares one metric across test sets; this export lets
  ``sslbench-jax analyze --metric primary`` compare ImageNet val top-1 with
  ReaL's real_top1 and R / A's subset_top1 (rank changes across variants).

  Args:
    path: the ``.jsonl`` store.
    out_csv: output CSV path (written atomically).

  Returns:
    The number of data rows written.
  """
  rec = read_results(path)
  return _write_csv(rec[primary_mask(rec)], out_csv, metric=PRIMARY)


def _write_csv(rec: np.ndarray, out_csv: str, metric: str | None = None) -> int:
  """``rec`` as CSV; ``metric`` replaces every row's metric name when given."""
  with atomic.atomic_open(out_csv, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(EXPORT_COLUMNS)
    for r in rec:
      w.writerow([repr(float(r[k])) if k == "value" else
                  metric if k == "metric" and metric is not None else r[k]
                  for k in EXPORT_COLUMNS])
  return len(rec)


def export_parquet(path: str, out_parquet: str, deduplicate: bool = True) -> int:
  """Writes the store as Parquet (needs the optional ``pyarrow``).

  Returns:
    The number of rows written.

  Raises:
    ImportError: pyarrow is not installed.
  """
  try:
    import pyarrow as pa  # optional dependency
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError("Parquet export needs pyarrow (pip install pyarrow); "
                      "use export_csv instead") from None
  rec = read_results(path, deduplicate)
  table = pa.table({k: rec[k].tolist() for k in EXPORT_COLUMNS})
  with atomic.atomic_open(out_parquet) as f:
    pq.write_table(table, f)
  return len(rec)

