"""Converted weights on disk: a torch-free ``.npz`` plus a JSON sidecar.

The ``.npz`` holds the Flax variables tree flattened with ``/`` separators
(``params/stem_conv/kernel``); the sidecar ``<file>.json`` holds the
architecture, its options, and the conversion provenance (source format,
sha256 of the input checkpoint, mapping counts, dropped keys).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from flax import traverse_util

from sslbench_jax import atomic


def sidecar_path(path: str) -> str:
  return path + ".json"


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def save_variables(path: str, variables: Any, meta: dict[str, Any]) -> None:
  """Writes ``variables`` to ``path`` (npz) and ``meta`` to its sidecar, atomically.

  ``meta`` must contain ``arch`` and ``arch_options`` (kwargs for
  ``registry.create_model``).
  """
  for key in ("arch", "arch_options"):
    if key not in meta:
      raise ValueError(f"weights metadata needs {key!r}")
  flat = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(dict(variables)).items()}
  with atomic.atomic_open(path) as f:
    np.savez(f, **flat)
  meta = dict(meta, weights_sha256=sha256_file(path))
  try:
    atomic.write_text(sidecar_path(path), json.dumps(meta, indent=2, sort_keys=True))
  except BaseException:
    os.remove(path)  # weights without their sidecar are unusable: leave nothing
    raise


def load_variables(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads weights written by ``save_variables``: returns ``(variables, meta)``."""
  side = sidecar_path(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file {path} does not exist; create it with "
                            "`sslbench-jax convert`")
  if not os.path.exists(side):
    raise FileNotFoundError(f"{side} is missing: weights must come from "
                            "`sslbench-jax convert` (it writes the sidecar)")
  with open(side) as f:
    meta = json.load(f)
  with np.load(path, allow_pickle=False) as z:
    flat = {tuple(k.split("/")): z[k] for k in z.files}
  return traverse_util.unflatten_dict(flat), meta
