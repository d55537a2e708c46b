"""On-disk feature cache: content-addressed entries written in checksummed shards.

An entry lives in ``<cache_root>/<key digest>/`` where the digest hashes
everything the features depend on (``CacheKey``: arch and its options, weights
sha256, dataset, split, preprocessing, representation, dtype, code version).
Inside an entry:

* shard files ``<layout>-p<process>-s<shard>.<sha256>.npz``, one per process
  and per ``steps_per_shard`` batches. Each is written to a temporary file and
  renamed, and its name carries the sha256 of its bytes, so the checksum is
  recorded in the same atomic step as the file itself: a killed writer leaves
  at most a ``.tmp-*`` file, and a shard whose bytes do not hash to its name
  (bit rot, truncation, tampering) is never read, it is deleted and recomputed.
  Shards hold ``features`` (n, D) float32, ``index`` (n,) int64 (positions in
  the dataset), ``labels``, ``ids`` and ``skipped`` (positions of examples
  the source masked out, e.g. corrupt images it was told to skip). They are
  zip archives with fixed timestamps (plain ``.npz`` to NumPy), so the same
  features always give the same bytes.
* ``manifest.json``, written by process 0 only: the key, the layout, the
  provenance and, once complete, every shard with its sha256. It holds no
  timestamps or host names, so a resumed run ends with the same bytes as an
  uninterrupted one.

``<layout>`` hashes how the work was split (examples, processes, rows per
process and step, steps per shard, library versions). A run only resumes
shards of its own layout; a complete entry is loadable whatever layout wrote it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import zipfile
from typing import Any

import numpy as np

from sslbench_jax import atomic
from sslbench_jax.data import sharding
from sslbench_jax.features import io as features_io

# Bump when the cache's file format or what extraction computes changes.
CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^([0-9a-f]{12})-p(\d{5})-s(\d{6})\.([0-9a-f]{64})\.npz$")
_SHARD_KEYS = ("features", "index", "labels", "ids", "skipped")
# zip entries get this timestamp so equal arrays give equal bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def code_version() -> str:
  """Version string folded into every cache key (package + cache format)."""
  import sslbench_jax  # pylint: disable=g-import-not-at-top
  return f"sslbench_jax-{sslbench_jax.__version__}/cache-{CACHE_FORMAT_VERSION}"


@dataclasses.dataclass(frozen=True)
class CacheKey:
  """Everything the cached features depend on.

  Attributes:
    arch: registry architecture name.
    arch_options: JSON-able options passed to ``create_model``.
    weights_sha256: sha256 of the weights file.
    dataset: dataset name, or a description of an image folder and its files.
    split: dataset split ("" for a folder).
    preprocessing: preset name (with overrides, if any).
    representation: model output used as features ("pre_logits", "cls", ...).
    dtype: compute dtype ("float32" or "bfloat16").
    code_version: ``code_version()`` by default.
  """
  arch: str
  arch_options: dict[str, Any]
  weights_sha256: str
  dataset: str
  split: str
  preprocessing: str
  representation: str
  dtype: str
  code_version: str = dataclasses.field(default_factory=code_version)

  def as_dict(self) -> dict[str, Any]:
    """The fields as a JSON-able dict (recorded in the manifest)."""
    return dataclasses.asdict(self)

  def digest(self) -> str:
    """sha256 of the canonical JSON of the key."""
    return _sha256_json(self.as_dict())


@dataclasses.dataclass(frozen=True)
class Layout:
  """How extraction splits ``num_examples`` into per-process batches and shards.

  Process ``p`` reads the examples ``data.sharding.shard_plan`` gives it (a
  contiguous block in ``"contiguous"`` mode) in batches of
  ``rows_per_process`` (-1 = padding); shard ``k`` of a process holds its
  steps ``[k * steps_per_shard, (k + 1) * steps_per_shard)``.
  """
  num_examples: int
  num_processes: int
  rows_per_process: int
  steps_per_shard: int
  mode: str = "contiguous"
  versions: tuple[tuple[str, str], ...] = ()

  @property
  def global_batch(self) -> int:
    return self.num_processes * self.rows_per_process

  def plan(self, process: int) -> sharding.ShardPlan:
    """The padded, masked batches of ``process``."""
    return _plan(self.num_examples, self.global_batch, self.num_processes, process,
                 self.mode)

  @property
  def num_steps(self) -> int:
    return self.plan(0).steps  # equal on every process by construction

  @property
  def num_shards(self) -> int:
    return -(-self.num_steps // self.steps_per_shard)

  def shard_steps(self, shard: int) -> range:
    start = shard * self.steps_per_shard
    return range(start, min(start + self.steps_per_shard, self.num_steps))

  def tag(self) -> str:
    """12 hex digits identifying the layout in shard file names."""
    return _sha256_json(dataclasses.asdict(self))[:12]


@functools.lru_cache(maxsize=16)
def _plan(num_examples, global_batch, num_processes, process, mode):
  return sharding.shard_plan(num_examples, global_batch, num_processes, process, mode)


def entry_dir(cache_root: str, key: CacheKey) -> str:
  """Directory of the cache entry for ``key`` under ``cache_root``."""
  return os.path.join(cache_root, key.digest()[:24])


def shard_name(layout_tag: str, process: int, shard: int, sha256: str) -> str:
  """File name of a shard: layout, process, shard index and content checksum."""
  return f"{layout_tag}-p{process:05d}-s{shard:06d}.{sha256}.npz"


def encode_shard(arrays: dict[str, np.ndarray]) -> bytes:
  """Serialises shard arrays to deterministic ``.npz`` bytes (readable by np.load)."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
    for name in _SHARD_KEYS:
      info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
      info.external_attr = 0o644 << 16
      with z.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(arrays[name]), allow_pickle=False)
  return buf.getvalue()


def decode_shard(data: bytes) -> dict[str, np.ndarray]:
  """Inverse of ``encode_shard``; raises ValueError on malformed bytes."""
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
      return {k: z[k] for k in _SHARD_KEYS}
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"malformed shard: {e}") from None


def write_shard(directory: str, layout_tag: str, process: int, shard: int,
                arrays: dict[str, np.ndarray]) -> tuple[str, str]:
  """Atomically writes one shard; returns ``(file name, sha256)``."""
  data = encode_shard(arrays)
  digest = hashlib.sha256(data).hexdigest()
  name = shard_name(layout_tag, process, shard, digest)
  atomic.write_bytes(os.path.join(directory, name), data,
                      prefix=f".tmp-p{process:05d}-")
  return name, digest


def read_shard(path: str, sha256: str) -> dict[str, np.ndarray] | None:
  """Reads a shard if its bytes hash to ``sha256``; None when they do not."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None
  if hashlib.sha256(data).hexdigest() != sha256:
    return None
  try:
    return decode_shard(data)
  except ValueError:
    return None


def scan_shards(directory: str, layout_tag: str, process: int
                ) -> dict[int, tuple[str, str, dict[str, np.ndarray]]]:
  """Finds this process's valid shards of ``layout_tag``; deletes corrupt ones.

  Also removes the process's leftover temporary files (a killed writer;
  process 0 also owns the manifest's).

  Args:
    directory: cache entry directory.
    layout_tag: ``Layout.tag()`` of the current run.
    process: this process's index.

  Returns:
    ``{shard index: (file name, sha256, arrays)}`` of shards whose bytes
    match their recorded checksum.
  """
  found: dict[int, tuple[str, str, dict[str, np.ndarray]]] = {}
  if not os.path.isdir(directory):
    return found
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.startswith(f".tmp-p{process:05d}-") or (
        process == 0 and name.startswith(".tmp-manifest-")):
      _remove(path)
      continue
    m = _SHARD_RE.match(name)
    if not m or m.group(1) != layout_tag or int(m.group(2)) != process:
      continue
    shard, digest = int(m.group(3)), m.group(4)
    arrays = read_shard(path, digest)
    if arrays is None or shard in found:
      _remove(path)  # corrupt (or a duplicate): never read, recomputed
      continue
    found[shard] = (name, digest, arrays)
  return found


def remove_stale(directory: str, keep: set[str], process: int | None) -> None:
  """Deletes shard files not in ``keep`` (of ``process``, or of all when None)."""
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    m = _SHARD_RE.match(name)
    if m and name not in keep and (process is None or int(m.group(2)) == process):
      _remove(os.path.join(directory, name))


def read_manifest(directory: str) -> dict[str, Any] | None:
  """The entry's manifest, or None when absent or unreadable."""
  try:
    with open(os.path.join(directory, MANIFEST)) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
    return None


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
  """Atomically writes the manifest (process 0 only)."""
  data = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
  atomic.write_bytes(os.path.join(directory, MANIFEST), data, prefix=".tmp-manifest-")


def load_entry(directory: str) -> features_io.FeatureSet:
  """Loads a complete cache entry as a ``FeatureSet``, verifying every shard.

  Args:
    directory: a cache entry directory (``entry_dir(root, key)``).

  Returns:
    The features of all examples in dataset order, with the provenance meta
    recorded at extraction.

  Raises:
    FileNotFoundError: no manifest in ``directory``.
    ValueError: the entry is incomplete, or a shard is missing or corrupt.
  """
  manifest = read_manifest(directory)
  if manifest is None:
    raise FileNotFoundError(f"no feature cache in {directory} ({MANIFEST} missing)")
  if manifest.get("status") != "complete":
    raise ValueError(f"feature cache {directory} is incomplete (an extraction "
                     "was interrupted); rerun it to resume")
  parts = []
  for entry in manifest["shards"]:
    arrays = read_shard(os.path.join(directory, entry["file"]), entry["sha256"])
    if arrays is None:
      raise ValueError(f"shard {entry['file']} in {directory} is missing or fails "
                       "its checksum; rerun the extraction to recompute it")
    parts.append(arrays)
  fs = assemble(parts, manifest["num_examples"], manifest["feature_dim"],
                manifest["meta"])
  return fs


def remove_superseded(cache_root: str, key: CacheKey, dataset_prefix: str) -> list[str]:
  """Deletes interrupted entries of an earlier version of ``key``'s data.

  An image folder's key holds a fingerprint of its files, so fixing the
  corrupt image that stopped a run gives a new key: the old, interrupted
  entry could never be resumed or read. Entries whose manifest says
  ``interrupted`` (a run that failed; a ``running`` one may be alive) and
  whose key equals ``key`` but for a ``dataset`` starting with
  ``dataset_prefix`` are removed.

  Args:
    cache_root: the cache directory.
    key: the key about to be extracted (its own entry is kept).
    dataset_prefix: what the superseded keys' ``dataset`` starts with.

  Returns:
    The removed entry directories.
  """
  removed = []
  if not os.path.isdir(cache_root):
    return removed
  mine = key.as_dict()
  for name in sorted(os.listdir(cache_root)):
    directory = os.path.join(cache_root, name)
    manifest = read_manifest(directory) if os.path.isdir(directory) else None
    other = (manifest or {}).get("key")
    if (not isinstance(other, dict) or manifest.get("status") != "interrupted"
        or other == mine or not str(other.get("dataset", "")).startswith(dataset_prefix)
        or {k: v for k, v in other.items() if k != "dataset"}
        != {k: v for k, v in mine.items() if k != "dataset"}):
      continue
    for entry_file in os.listdir(directory):
      if _SHARD_RE.match(entry_file) or entry_file == MANIFEST or entry_file.startswith(".tmp-"):
        _remove(os.path.join(directory, entry_file))
    try:
      os.rmdir(directory)
    except OSError:
      pass  # something else lives there: leave it
    removed.append(directory)
  return removed


def load(cache_root: str, key: CacheKey) -> features_io.FeatureSet:
  """Loads the complete entry of ``key`` under ``cache_root``."""
  return load_entry(entry_dir(cache_root, key))


def assemble(parts: list[dict[str, np.ndarray]], num_examples: int,
             feature_dim: int, meta: dict[str, Any]) -> features_io.FeatureSet:
  """Concatenates shard arrays into a ``FeatureSet`` in dataset order.

  Raises:
    ValueError: the kept and skipped positions are not exactly
      ``0 .. num_examples - 1`` once each, or nothing was kept.
  """
  skipped = np.concatenate([np.asarray(p.get("skipped", []), np.int64) for p in parts])
  parts = [p for p in parts if len(p["index"])]
  if not parts:
    raise ValueError("no examples in the feature shards")
  index = np.concatenate([p["index"] for p in parts])
  order = np.argsort(index, kind="stable")
  if not np.array_equal(np.sort(np.concatenate([index, skipped])),
                        np.arange(num_examples)):
    raise ValueError(f"feature shards do not cover examples 0..{num_examples - 1} "
                     "exactly once")
  features = np.concatenate([p["features"] for p in parts])[order]
  if features.shape[1] != feature_dim:
    raise ValueError(f"feature dim {features.shape[1]} != manifest {feature_dim}")
  labels = np.concatenate([p["labels"] for p in parts])[order]
  ids = np.concatenate([p["ids"].astype(str) for p in parts])[order]
  meta = dict(meta, num_examples=num_examples, num_skipped=int(len(skipped)))
  if len(skipped):
    meta["skipped_indices"] = sorted(int(i) for i in skipped)
  return features_io.FeatureSet(features, labels, ids, meta)


def _sha256_json(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass  # another process cleaned it up first
