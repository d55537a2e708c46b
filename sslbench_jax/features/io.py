"""A feature set on disk: one ``.npz`` with features, labels, ids and provenance.

Keys: ``features`` (N, D) float32; ``labels`` (N,) int64 (-1 when unknown) or
(N, C) multi-hot int8; ``ids`` (N,) str (file names or dataset example ids);
``meta`` 0-d str holding a JSON dict with the provenance (arch, weights sha256,
dataset, split, preprocessing, representation, dtype, device count, versions).

A file made from a registry dataset is self-describing: ``meta["source"]`` is
the dataset's ``describe()``, whose ``label_space`` (name, num_classes,
multi_label, metrics, and the class ``subset`` of ImageNet-R / -A) is all that
scoring needs (``metrics.label_space.read_label_space``). A file cut out of
another (ImageNet ReaL from val, ``data.derived``) records ``derived_from``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from typing import Any
import zipfile
import zlib

import numpy as np

from sslbench_jax import atomic


@dataclasses.dataclass
class FeatureSet:
  features: np.ndarray
  labels: np.ndarray
  ids: np.ndarray
  meta: dict[str, Any]

  def __post_init__(self):
    n = len(self.features)
    if self.features.ndim != 2:
      raise ValueError(f"features must be (N, D), got {self.features.shape}")
    if len(self.labels) != n or len(self.ids) != n:
      raise ValueError(f"features/labels/ids lengths differ: {n}, "
                       f"{len(self.labels)}, {len(self.ids)}")


def save(path: str, fs: FeatureSet) -> None:
  """Writes ``fs`` atomically (a killed writer leaves no partial file)."""
  with atomic.atomic_open(path, suffix=".npz") as f:
    np.savez(f, features=fs.features, labels=fs.labels,
             ids=np.asarray(fs.ids).astype(str),
             meta=np.asarray(json.dumps(fs.meta, sort_keys=True)))


def load(path: str, *, allow_nonfinite: bool = False) -> FeatureSet:
  """Reads and validates a feature ``.npz`` written by ``save``.

  The file is untrusted data: no pickles, and every array is checked before
  anything uses it, so a bad file fails here, with its name, instead of
  giving a silent wrong number later.

  Args:
    path: the ``.npz`` file.
    allow_nonfinite: accept NaN/inf features (default: refuse them; every
      probe would otherwise score such rows as class 0 or diverge).

  Returns:
    The ``FeatureSet``.

  Raises:
    OSError: ``path`` is missing, a directory, or not readable (permission).
    ValueError: one line naming ``path``: truncated, corrupt or not an
      ``.npz`` (e.g. a JPEG renamed), missing arrays, wrong dtypes or shapes,
      lengths that differ, a ``meta`` that is not a JSON object, or rows with
      NaN/inf features.
  """
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
    if magic not in _ZIP_MAGIC:
      raise _NotFeatureFile(f"{path} is not a feature file: not an .npz (zip) "
                            f"archive (starts with {magic!r})")
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise _NotFeatureFile(f"{path} is not a feature file: not an .npz archive")
    with z:
      missing = [k for k in _KEYS if k not in z.files]
      if missing:
        raise _NotFeatureFile(f"{path} is not a feature file: missing {missing}")
      arrays = {k: z[k] for k in _KEYS}
  except _NotFeatureFile as e:
    raise ValueError(str(e)) from None
  except OSError as e:
    if e.errno in _PASS_THROUGH_ERRNOS:
      raise  # no such file, no permission: about the path, keeps its type
    raise ValueError(f"cannot read feature file {path}: "
                     f"{_one_line(e)}") from None
  except (EOFError, ValueError, KeyError, zipfile.BadZipFile,
          zlib.error, NotImplementedError) as e:
    raise ValueError(f"cannot read feature file {path}: "
                     f"{_one_line(e)}") from None
  return _validate(path, arrays, allow_nonfinite)


_KEYS = ("features", "labels", "ids", "meta")
# OSErrors about the path rather than the bytes (the CLI maps them to exit
# codes by type); any other (e.g. EINVAL from a corrupt zip directory's seek)
# means a bad file.
_PASS_THROUGH_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM,
                                  errno.EISDIR, errno.ENOTDIR})
# An .npz is a zip archive: a local file header, or an empty archive's end record.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# Rows checked for NaN/inf at a time (bounds the temporary boolean array).
_FINITE_CHUNK = 1 << 16


class _NotFeatureFile(Exception):
  pass


def _one_line(e: BaseException) -> str:
  msg = str(e).strip()
  return msg.splitlines()[0] if msg else type(e).__name__


def _validate(path: str, a: dict[str, np.ndarray],
              allow_nonfinite: bool) -> FeatureSet:
  x, y, ids, meta = (a[k] for k in _KEYS)
  bad = f"{path} is not a valid feature file:"
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{bad} features must be a floating-point (N, D) array, "
                     f"got {x.dtype} {x.shape}")
  n = len(x)
  if y.ndim not in (1, 2) or not (np.issubdtype(y.dtype, np.integer)
                                  or y.dtype == bool):
    raise ValueError(f"{bad} labels must be (N,) integer classes or (N, C) "
                     f"multi-hot integers, got {y.dtype} {y.shape}")
  if ids.ndim != 1 or ids.dtype.kind not in "USiu":
    raise ValueError(f"{bad} ids must be (N,) strings, got {ids.dtype} {ids.shape}")
  if len(y) != n or len(ids) != n:
    raise ValueError(f"{bad} {n} feature rows but {len(y)} labels and "
                     f"{len(ids)} ids")
  if meta.ndim != 0 or meta.dtype.kind not in "US":
    raise ValueError(f"{bad} meta must be a 0-d JSON string, got {meta.dtype} "
                     f"{meta.shape}")
  try:
    meta = json.loads(str(meta))
  except ValueError as e:
    raise ValueError(f"{bad} meta is not JSON ({_one_line(e)})") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{bad} meta must be a JSON object, got "
                     f"{type(meta).__name__}")
  if not allow_nonfinite:
    rows = count_nonfinite_rows(x)
    if rows:
      raise ValueError(f"{path}: {rows} of {n} feature rows contain NaN or inf "
                       "(first at row "
                       f"{first_nonfinite_row(x)}); refusing to use them")
  return FeatureSet(x, y, ids.astype(str), meta)


def count_nonfinite_rows(x: np.ndarray) -> int:
  """Number of rows of a 2-D array holding at least one NaN or inf."""
  return sum(int(np.count_nonzero(~np.isfinite(x[s:s + _FINITE_CHUNK]).all(1)))
             for s in range(0, len(x), _FINITE_CHUNK))


def first_nonfinite_row(x: np.ndarray) -> int | None:
  """Index of the first row holding a NaN or inf, or None."""
  for s in range(0, len(x), _FINITE_CHUNK):
    bad = np.flatnonzero(~np.isfinite(x[s:s + _FINITE_CHUNK]).all(1))
    if len(bad):
      return s + int(bad[0])
  return None
