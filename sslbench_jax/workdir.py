"""The state ``evaluate`` keeps in its workdir: lock, run id, config snapshots, progress.

* ``DIR/.lock``: one ``evaluate`` per workdir (``WorkdirLock``, an exclusive
  ``fcntl.flock`` held by the writer process for the whole run).
* ``DIR/configs/<run id>.json``: each run's config (``snapshot_config``).
* ``DIR/done.json``: which (model, protocol, dataset entry) steps are
  finished, for which inputs (``Progress``).

Every state file is written through ``sslbench_jax/atomic.py`` (a unique
temporary name renamed over the target), so a kill never leaves half a file
and concurrent writers never collide. ``read_json`` and ``diff`` are the
helpers the conversion records (``convert/cache.py``) share.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import socket
from typing import Any

from absl import logging

from sslbench_jax import atomic


class WorkdirBusyError(RuntimeError):
  """Another ``evaluate`` holds the workdir's lock (exit code 1)."""


def read_json(path: str) -> Any:
  """A JSON state file, or None when it is absent or unreadable as JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except ValueError as e:
    logging.warning("%s is not valid JSON (%s): ignored", path, e)
    return None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _short(v: Any) -> str:
  text = json.dumps(v, sort_keys=True)
  return text if len(text) <= 24 else text[:12] + "..." + text[-8:]


def diff(old: dict[str, Any], new: dict[str, Any]) -> str:
  """What differs between two input records, e.g. ``checkpoint_sha256 ab..->cd..``."""
  a, b = _flatten(old), _flatten(new)
  parts = [f"{k} {_short(a.get(k))} -> {_short(b.get(k))}"
           for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  return "; ".join(parts) or "nothing"


def fingerprint(inputs: dict[str, Any]) -> str:
  """The sha256 of a step's inputs (its key in ``done.json``)."""
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


class WorkdirLock:
  """An exclusive ``fcntl.flock`` on ``DIR/.lock`` for the whole run.

  Taken by the writer process only (the other processes of a multi-host run
  are part of the same run); every process learns the outcome, so a busy
  workdir stops all of them at once. The lock file holds the owner's pid and
  host for the message; the lock itself dies with the process (kill -9
  included).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self.fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    import numpy as np  # pylint: disable=g-import-not-at-top
    from sslbench_jax import parallel  # pylint: disable=g-import-not-at-top
    holder = ""
    writer = parallel.is_writer()
    if writer:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
      else:
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    ok = parallel.allgather(np.asarray(self.fd is not None or not writer, np.int32))
    if not int(np.asarray(ok).reshape(-1)[0]):
      self.__exit__()
      raise WorkdirBusyError(
          f"workdir {os.path.dirname(self.path)} is in use by another `sslbench-jax "
          f"evaluate` ({holder or 'process 0 of this run could not lock it'}; lock "
          f"{self.path}): wait for it to finish or use another --workdir")
    return self

  def __exit__(self, *exc: Any) -> None:
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None


def new_run_id(config_json: str) -> str:
  """``<UTC time>-<config sha256[:8]>``: names a run and its config snapshot."""
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
  return f"{now}-{hashlib.sha256(config_json.encode()).hexdigest()[:8]}"


def snapshot_config(workdir: str, run_id: str, config_json: str) -> str:
  """Keeps a run's config as ``DIR/configs/<run id>.json`` (atomically); returns the path."""
  path = os.path.join(workdir, "configs", f"{run_id}.json")
  atomic.write_text(path, config_json + "\n")
  return path


class Progress:
  """Which (model, protocol, dataset) steps are finished, and from what: ``DIR/done.json``.

  ``{step: {fingerprint, inputs, run_id, rows, finished}}``: a step is
  finished for the inputs whose sha256 is ``fingerprint`` (``plan.step_inputs``:
  checkpoint hash, model options, both splits with their data_dir and
  preprocessing, representation, dtype, protocol type and options, seed), by
  run ``run_id``, whose rows in the store carry the same ``step`` and
  ``run_id``. A step is marked only after its rows are in the store; rows of a
  step that is not marked by their run (a kill between the two writes) are
  dropped from the store at the next start (``reconcile``). A list (the old
  format: step names only) is read as steps of unknown inputs, recomputed.
  """

  def __init__(self, workdir: str, run_id: str = ""):
    self.path = os.path.join(workdir, "done.json")
    self.run_id = run_id
    loaded = read_json(self.path)
    if isinstance(loaded, list):  # written by an older version: no inputs
      loaded = {str(k): {} for k in loaded}
    self.done: dict[str, dict[str, Any]] = loaded if isinstance(loaded, dict) else {}

  @staticmethod
  def key(*parts: str) -> str:
    return "/".join(parts)

  def why_run(self, step: str, fingerprint_: str, inputs: dict[str, Any]) -> str | None:
    """None if ``step`` is finished for these inputs, else why it must run."""
    entry = self.done.get(step)
    if entry is None:
      return "not done yet"
    if entry.get("fingerprint") == fingerprint_:
      return None
    if "inputs" not in entry:
      return "recorded by an older version without its inputs: recomputing"
    return (f"inputs changed since run {entry.get('run_id')}: {diff(entry['inputs'], inputs)}"
            f"; recomputing (its {entry.get('rows', 0)} earlier rows are removed)")

  def _write(self) -> None:
    atomic.write_json(self.path, self.done, prefix=".tmp-done-")

  def forget(self, step: str, store_path: str) -> int:
    """Unmarks ``step`` (done.json first), then removes its rows from the store."""
    from sslbench_jax.results import store  # pylint: disable=g-import-not-at-top
    if self.done.pop(step, None) is not None:
      self._write()
    return len(store.remove_rows(store_path, lambda r: r["step"] == step))

  def reconcile(self, store_path: str) -> list[dict[str, Any]]:
    """Drops store rows of steps that their run did not mark finished."""
    from sslbench_jax.results import store  # pylint: disable=g-import-not-at-top

    def unfinished(row):
      return bool(row["step"]) and self.done.get(row["step"], {}).get("run_id") != row["run_id"]

    dropped = store.remove_rows(store_path, unfinished)
    if dropped:
      logging.warning("%s: removed %d rows of steps that were not marked done (a run "
                      "stopped between storing and marking them): %s", store_path,
                      len(dropped), ", ".join(sorted({r["step"] for r in dropped})))
    return dropped

  def mark(self, step: str, fingerprint_: str, inputs: dict[str, Any], rows: int) -> None:
    """Records ``step`` as finished for ``inputs`` (after its rows are stored)."""
    self.done[step] = dict(
        fingerprint=fingerprint_, inputs=inputs, run_id=self.run_id, rows=rows,
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    self._write()
