"""Converted weights on disk: a torch-free ``.npz`` plus a JSON sidecar.

The ``.npz`` holds the Flax variables tree flattened with ``/`` separators
(``params/stem_conv/kernel``); the sidecar ``<file>.json`` holds the
architecture, its options, and the conversion provenance (source format,
sha256 of the input checkpoint, mapping counts, dropped keys) and the sha256
of the ``.npz`` itself (``weights_sha256``).

The pair is committed as one unit, the sidecar last: ``save_variables``
removes an existing sidecar, replaces the ``.npz`` atomically, then writes
the sidecar atomically. So a sidecar exists only when the ``.npz`` next to it
is complete, and ``load_variables`` also checks the ``.npz`` against the
sidecar's ``weights_sha256``: a process killed at any point leaves either the
previous finished pair, an ``.npz`` without a sidecar (refused as unfinished),
or temporary files. Temporary files are named
``.tmp-<file>[.json]~<host>~<pid>~<random>``; those of writers that are no
longer running on this host are removed by the next ``save_variables`` or
``load_variables`` of the same file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import tempfile
import zipfile
from typing import Any

import numpy as np
from flax import traverse_util

from sslbench_jax import atomic

# Test hook: the stage at which ``save_variables`` SIGKILLs its own process
# (``weights_tmp``: .npz temp written; ``weights_replaced``: .npz renamed, no
# sidecar yet; ``sidecar_tmp``: sidecar temp written, not renamed).
_FAULT_ENV = "SSLBENCH_FAULT_AT"
# npz key prefix and sidecar key of a released linear head (convert/heads.py).
RELEASED_HEAD = "released_head"


def sidecar_path(path: str) -> str:
  return path + ".json"


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"


def _temp_prefix(path: str) -> str:
  return f".tmp-{os.path.basename(path)}~{_host()}~{os.getpid()}~"


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def clean_stale_temps(path: str) -> list[str]:
  """Removes temporary files that killed writers of ``path`` left behind.

  Only files named by ``save_variables`` for ``path`` or its sidecar, written
  on this host by a process that is no longer running, are removed; a
  concurrent writer's files and anything else in the folder are kept.

  Returns:
    The removed file paths.
  """
  directory = os.path.dirname(os.path.abspath(path))
  pattern = re.compile(rf"\.tmp-{re.escape(os.path.basename(path))}(\.json)?"
                       rf"~{re.escape(_host())}~(\d+)~")
  removed = []
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return removed
  for name in names:
    m = pattern.match(name)
    if m and not _alive(int(m.group(2))):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, name))
        removed.append(os.path.join(directory, name))
  return removed


def _fault_point(stage: str) -> None:
  if os.environ.get(_FAULT_ENV) == stage:
    os.kill(os.getpid(), signal.SIGKILL)


def check_writable(path: str) -> None:
  """Fails fast (``OSError``) if ``path``'s existing folder cannot take a file.

  Also removes stale temporary files of ``path`` (``clean_stale_temps``). A
  folder that does not exist yet is created only when the weights are saved.
  """
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    return
  clean_stale_temps(path)
  fd, probe = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(path))
  os.close(fd)
  os.remove(probe)


def save_variables(path: str, variables: Any, meta: dict[str, Any]) -> None:
  """Writes ``variables`` to ``path`` (npz) and ``meta`` to its sidecar, as one unit.

  ``meta`` must contain ``arch`` and ``arch_options`` (kwargs for
  ``registry.create_model``). See the module docstring for the commit order.

  Raises:
    ValueError: ``meta`` lacks a required key.
    OSError: the folder is not writable, the disk is full...; neither a
      sidecar nor a temporary file is left, so ``path`` is not loadable.
  """
  for key in ("arch", "arch_options"):
    if key not in meta:
      raise ValueError(f"weights metadata needs {key!r}")
  flat = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(dict(variables)).items()}
  clean_stale_temps(path)
  side = sidecar_path(path)
  with contextlib.suppress(FileNotFoundError):
    os.remove(side)  # from here on ``path`` reads as unfinished
  with atomic.atomic_open(path, prefix=_temp_prefix(path)) as f:
    np.savez(f, **flat)
    f.flush()
    _fault_point("weights_tmp")
  _fault_point("weights_replaced")
  meta = dict(meta, weights_sha256=sha256_file(path))
  try:
    with atomic.atomic_open(side, "w", encoding="utf-8",
                            prefix=_temp_prefix(side)) as f:
      f.write(json.dumps(meta, indent=2, sort_keys=True))
      f.flush()
      _fault_point("sidecar_tmp")
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(path)  # weights without their sidecar are unusable: leave nothing
    raise


def is_complete(path: str) -> bool:
  """Whether ``path`` and its sidecar form a finished ``save_variables`` output."""
  try:
    with open(sidecar_path(path)) as f:
      meta = json.load(f)
    return os.path.isfile(path) and meta.get("weights_sha256") in (
        None, sha256_file(path))
  except (OSError, ValueError, AttributeError):
    return False


def load_variables(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads weights written by ``save_variables``: returns ``(variables, meta)``.

  Raises:
    FileNotFoundError: no ``path``, or no sidecar (an interrupted conversion
      or a file not written by ``sslbench-jax convert``).
    ValueError: the sidecar is not JSON, or the ``.npz`` is not the one the
      sidecar describes (``weights_sha256`` differs).
  """
  side = sidecar_path(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file {path} does not exist; create it with "
                            "`sslbench-jax convert`")
  with contextlib.suppress(OSError):
    clean_stale_temps(path)
  if not os.path.exists(side):
    raise FileNotFoundError(f"{side} is missing: {path} is an unfinished conversion "
                            "(interrupted?) or was not written by `sslbench-jax "
                            "convert`; re-run convert")
  with open(side) as f:
    try:
      meta = json.load(f)
    except ValueError as e:
      raise ValueError(f"{side} is not valid JSON ({e}); re-run convert") from None
  expected = meta.get("weights_sha256") if isinstance(meta, dict) else None
  if not isinstance(meta, dict):
    raise ValueError(f"{side} is not a weights sidecar; re-run convert")
  if expected is not None and sha256_file(path) != expected:
    raise ValueError(f"{path} is not the file its sidecar {side} describes "
                     "(weights_sha256 differs: an interrupted or mixed conversion); "
                     "re-run convert")
  # A weights file is an input too: its sizes are checked before NumPy
  # allocates them (lazy import: the convert package imports this module).
  from sslbench_jax.convert import readers  # pylint: disable=g-import-not-at-top
  try:
    readers.check_npz(path)
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path} is not an .npz ({e}); re-run convert") from None
  except ValueError as e:  # ConversionError
    raise ValueError(f"{path}: {e}") from None
  with np.load(path, allow_pickle=False) as z:
    # A released linear head (convert --head) is not a model variable.
    flat = {tuple(k.split("/")): z[k] for k in z.files
            if not k.startswith(RELEASED_HEAD + "/")}
  return traverse_util.unflatten_dict(flat), meta


def load_released_head(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
  """The released linear head stored with the weights (``convert --head``).

  Returns:
    ``({"weight": (C, D), "bias": (C,)}, sidecar["released_head"])``, or None
    when the weights carry no head.

  Raises:
    As ``load_variables``; ValueError if the sidecar names a head the
    ``.npz`` lacks.
  """
  _, meta = load_variables(path)  # checks the pair (sha256, sizes)
  entry = meta.get(RELEASED_HEAD)
  if not entry:
    return None
  with np.load(path, allow_pickle=False) as z:
    names = {f"{RELEASED_HEAD}/{k}": k for k in ("weight", "bias")}
    if not set(names) <= set(z.files):
      raise ValueError(f"{path}: its sidecar describes a released head but the .npz "
                       f"lacks {', '.join(sorted(set(names) - set(z.files)))}")
    return {short: z[name] for name, short in names.items()}, entry
