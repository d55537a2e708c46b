"""Atomic file writes: a killed writer never leaves a partial file behind.

Every output of the project (weights, feature files and cache shards, results
exports, tables, plots, reports) is written through ``atomic_open``: the data
goes to a temporary file in the destination folder, is fsynced, gets ordinary
permissions, and is renamed over the destination in one step.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterator


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", *, prefix: str = ".tmp-", suffix: str = "",
                **open_kwargs) -> Iterator[IO]:
  """Opens a temporary file that replaces ``path`` when the block succeeds.

  Args:
    path: destination; its folder is created if needed.
    mode: "wb" or "w" (text; pass ``encoding``/``newline`` in ``open_kwargs``).
    prefix: temporary file name prefix (readers skip such files).
    suffix: temporary file name suffix (some writers infer formats from it).
    **open_kwargs: passed to ``os.fdopen``.

  Yields:
    The open file object.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # A unique name per writer (mkstemp): two writers of the same file never
  # share (and delete or rename) each other's temporary file.
  try:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
  except OSError as e:  # read-only / full: name the destination, not a temp name
    raise type(e)(e.errno, e.strerror, path) from None
  try:
    try:
      with os.fdopen(fd, mode, **open_kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
      os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
      os.replace(tmp, path)
    except OSError as e:
      # Writes through a file object (ENOSPC, EDQUOT) name no file: name the
      # destination, which is what the user can act on.
      if e.filename is None or e.filename == tmp:
        raise type(e)(e.errno, e.strerror, path) from None
      raise
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_bytes(path: str, data: bytes, **kwargs) -> None:
  """Writes ``data`` to ``path`` atomically."""
  with atomic_open(path, "wb", **kwargs) as f:
    f.write(data)


def write_text(path: str, text: str, encoding: str = "utf-8") -> None:
  """Writes ``text`` to ``path`` atomically."""
  with atomic_open(path, "w", encoding=encoding) as f:
    f.write(text)


def write_json(path: str, obj: Any, **kwargs: Any) -> None:
  """Writes ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
  with atomic_open(path, "w", encoding="utf-8", **kwargs) as f:
    json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
    f.write("\n")
