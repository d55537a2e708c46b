"""Tests of features.cache: atomic checksummed shards, kill -9 and resume, corruption.

"Byte-identical" compares every file name and every byte of two cache entries:
an interrupted-then-resumed run must leave exactly what an uninterrupted run
leaves. The features themselves are checked against a direct forward pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import time

import numpy as np
import pytest

import extract_test as et
from sslbench_jax.features import cache as cache_lib

NUM_SHARDS = 6  # 11 images, 2 per step, 1 step per shard


def _snapshot(directory: str) -> dict[str, bytes]:
  out = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      out[name] = f.read()
  return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("images"))
  et.write_images(directory)
  return directory


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory) -> dict[str, bytes]:
  root = str(tmp_path_factory.mktemp("cache_ref"))
  result = et.run_extract(images, cache=root)
  assert result.stats.shards_computed == NUM_SHARDS == result.stats.shards_written
  et.check_features(result.features, images)
  return _snapshot(result.entry_dir)


def test_shard_bytes_are_deterministic_and_npz_readable(tmp_path):
  arrays = dict(features=np.arange(6, dtype=np.float32).reshape(3, 2),
                index=np.array([4, 5, 6], np.int64), labels=np.array([1, -1, 3]),
                ids=np.array(["a", "bb", "c"]), skipped=np.array([7], np.int64))
  data = cache_lib.encode_shard(arrays)
  assert cache_lib.encode_shard({k: v.copy() for k, v in arrays.items()}) == data
  path = tmp_path / "s.npz"
  path.write_bytes(data)
  with np.load(path) as z:  # a plain npz for numpy
    for k, v in arrays.items():
      np.testing.assert_array_equal(z[k], v)
  name, digest = cache_lib.write_shard(str(tmp_path), "abcdef012345", 3, 7, arrays)
  assert digest == hashlib.sha256(data).hexdigest()
  assert name == f"abcdef012345-p00003-s000007.{digest}.npz"


def test_key_digest_depends_on_every_field(images):
  key = et.tiny_key(images)
  digests = {key.digest()}
  changes = dict(arch="tiny2", arch_options={"pool": "mean"}, weights_sha256="1" * 64,
                 dataset="other", split="train", preprocessing="imagenet_bicubic",
                 representation="cls", dtype="bfloat16", code_version="x")
  for field, value in changes.items():
    digests.add(dataclasses.replace(key, **{field: value}).digest())
  assert len(digests) == len(changes) + 1
  assert dataclasses.replace(key).digest() == key.digest()


def test_kill_after_first_shard_then_resume_is_byte_identical(images, tmp_path,
                                                              uninterrupted):
  root = str(tmp_path / "cache")
  proc = et.start_worker(dict(images=images, out=str(tmp_path / "f.npz"), cache=root,
                              batch_size_per_device=2, kill_after_shards=1))
  proc.communicate(timeout=120)
  assert proc.returncode == -9  # SIGKILL, no cleanup ran
  entry = cache_lib.entry_dir(root, et.tiny_key(images))
  shards = [f for f in os.listdir(entry) if f.endswith(".npz")]
  assert len(shards) == 1 and "-s000000." in shards[0]
  assert cache_lib.read_manifest(entry)["status"] == "running"
  with pytest.raises(ValueError, match="incomplete"):
    cache_lib.load_entry(entry)

  result = et.run_extract(images, cache=root)
  assert (result.stats.shards_reused, result.stats.shards_computed,
          result.stats.shards_written) == (1, NUM_SHARDS - 1, NUM_SHARDS - 1)
  assert not result.stats.from_complete_entry
  et.check_features(result.features, images)
  assert _snapshot(entry) == uninterrupted
  et.check_features(cache_lib.load(root, et.tiny_key(images)), images)


@pytest.mark.parametrize("delay", [0.0, 0.13, 0.31])
def test_kill_at_an_arbitrary_moment_then_resume(images, tmp_path, uninterrupted, delay):
  # An external SIGKILL some time after the first shard lands: between shards,
  # during a forward pass or during a write. Whatever survives is either a
  # complete, checksummed shard (reused) or nothing the resume will read.
  root = str(tmp_path / "cache")
  entry = cache_lib.entry_dir(root, et.tiny_key(images))
  proc = et.start_worker(dict(images=images, out=str(tmp_path / "f.npz"), cache=root,
                              batch_size_per_device=2, sleep_after_shard=0.05))
  deadline = time.time() + 120
  while not (os.path.isdir(entry) and any(n.endswith(".npz") for n in os.listdir(entry))):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
    time.sleep(0.005)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  intact = 0
  for name in os.listdir(entry):
    if name.endswith(".npz"):
      data = open(os.path.join(entry, name), "rb").read()
      intact += hashlib.sha256(data).hexdigest() == name.split(".")[-2]
  assert intact >= 1

  result = et.run_extract(images, cache=root)
  if result.stats.from_complete_entry:  # the kill came after the last write
    assert intact == NUM_SHARDS
  else:
    assert result.stats.shards_reused == intact
    assert result.stats.shards_computed == NUM_SHARDS - intact
  et.check_features(result.features, images)
  assert _snapshot(entry) == uninterrupted


def test_partial_and_corrupt_files_are_never_read(images, tmp_path, uninterrupted):
  root = str(tmp_path / "cache")
  entry = cache_lib.entry_dir(root, et.tiny_key(images))
  os.makedirs(entry)
  names = sorted(n for n in uninterrupted if n.endswith(".npz"))
  # Shard 0 intact; shard 1 truncated (as if cut short); shard 2 with a flipped
  # byte; shard 3 as a leftover temporary file of a killed writer.
  open(os.path.join(entry, names[0]), "wb").write(uninterrupted[names[0]])
  open(os.path.join(entry, names[1]), "wb").write(uninterrupted[names[1]][:100])
  flipped = bytearray(uninterrupted[names[2]])
  flipped[-40] ^= 0x01
  open(os.path.join(entry, names[2]), "wb").write(bytes(flipped))
  open(os.path.join(entry, ".tmp-p00000-xyz"), "wb").write(uninterrupted[names[3]][:50])

  result = et.run_extract(images, cache=root)
  assert (result.stats.shards_reused, result.stats.shards_computed) == (1, NUM_SHARDS - 1)
  et.check_features(result.features, images)
  assert _snapshot(entry) == uninterrupted


def test_corrupted_complete_entry_recomputes_only_that_shard(images, tmp_path,
                                                             uninterrupted):
  root = str(tmp_path / "cache")
  entry = cache_lib.entry_dir(root, et.tiny_key(images))
  os.makedirs(entry)
  for name, data in uninterrupted.items():
    open(os.path.join(entry, name), "wb").write(data)
  again = et.run_extract(images, cache=root)
  assert again.stats.from_complete_entry and again.stats.shards_computed == 0
  et.check_features(again.features, images)

  victim = sorted(n for n in uninterrupted if n.endswith(".npz"))[4]
  data = bytearray(uninterrupted[victim])
  data[len(data) // 2] ^= 0xFF
  open(os.path.join(entry, victim), "wb").write(bytes(data))
  with pytest.raises(ValueError, match="fails its checksum"):
    cache_lib.load_entry(entry)
  result = et.run_extract(images, cache=root)
  assert (result.stats.shards_reused, result.stats.shards_computed,
          result.stats.shards_written) == (NUM_SHARDS - 1, 1, 1)
  et.check_features(result.features, images)
  assert _snapshot(entry) == uninterrupted


def test_complete_entry_is_reused_with_another_batch_size(images, tmp_path):
  root = str(tmp_path / "cache")
  first = et.run_extract(images, cache=root, batch_size_per_device=4, steps_per_shard=2)
  again = et.run_extract(images, cache=root, batch_size_per_device=3)
  assert again.stats.from_complete_entry and again.stats.shards_computed == 0
  np.testing.assert_array_equal(again.features.features, first.features.features)
  # An interrupted entry of another layout is not resumed: its shards are
  # replaced by the new layout's.
  manifest = cache_lib.read_manifest(first.entry_dir)
  manifest["status"] = "running"
  cache_lib.write_manifest(first.entry_dir, manifest)
  third = et.run_extract(images, cache=root, batch_size_per_device=3)
  assert third.stats.shards_reused == 0 and third.stats.shards_written == 4
  tags = {n.split("-")[0] for n in os.listdir(first.entry_dir) if n.endswith(".npz")}
  assert tags == {cache_lib.read_manifest(first.entry_dir)["layout"]["tag"]}
  et.check_features(third.features, images)


def test_manifest_records_provenance_and_checksums(images, tmp_path):
  root = str(tmp_path / "cache")
  result = et.run_extract(images, cache=root)
  manifest = cache_lib.read_manifest(result.entry_dir)
  assert manifest["status"] == "complete" and manifest["num_examples"] == et.NUM_IMAGES
  assert manifest["key"] == et.tiny_key(images).as_dict()
  for shard in manifest["shards"]:
    with open(os.path.join(result.entry_dir, shard["file"]), "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == shard["sha256"]
  fs = cache_lib.load_entry(result.entry_dir)
  for field in ("arch", "weights_sha256", "dataset", "split", "preprocessing",
                "representation", "dtype", "device_count", "process_count"):
    assert field in fs.meta, field
  assert fs.meta["arch"] == "tiny" and fs.meta["cache_key"] == et.tiny_key(images).digest()
  shutil.rmtree(root)
  with pytest.raises(FileNotFoundError, match="manifest.json missing"):
    cache_lib.load_entry(result.entry_dir)
