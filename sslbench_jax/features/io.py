"""A feature set on disk: one ``.npz`` with features, labels, ids and provenance.

Keys: ``features`` (N, D) float32; ``labels`` (N,) int64 (-1 when unknown) or
(N, C) multi-hot int8; ``ids`` (N,) str (file names or dataset example ids);
``meta`` 0-d str holding a JSON dict with the provenance (arch, weights sha256,
dataset, split, preprocessing, representation, dtype, device count, versions).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

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


def load(path: str) -> FeatureSet:
  """Reads a feature ``.npz`` written by ``save``."""
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = {"features", "labels", "ids", "meta"} - set(z.files)
      if missing:
        raise ValueError(f"{path} is not a feature file: missing {sorted(missing)}")
      return FeatureSet(z["features"], z["labels"], z["ids"],
                        json.loads(str(z["meta"])))
  except (OSError, EOFError) as e:
    raise ValueError(f"cannot read feature file {path}: {e}") from None
