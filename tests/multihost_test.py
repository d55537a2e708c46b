"""Two processes x two CPU devices (jax.distributed, gloo): same features as a direct pass.

Each process is this suite's extraction worker (extract_test.py run as a
script) with ``--xla_force_host_platform_device_count=2``. 11 images, 2 rows
per device: a global batch of 8, so the second step has 5 padded rows, split
unevenly between the processes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import extract_test as et
import multiprocess_util
from sslbench_jax.features import cache as cache_lib
from sslbench_jax.features import io as features_io
from sslbench_jax import parallel


def _run_two_processes(config):
  port = multiprocess_util.free_port()
  procs = [et.start_worker(dict(config, coordinator=f"127.0.0.1:{port}",
                                num_processes=2, process_id=i), devices=2)
           for i in range(2)]
  try:
    return [et.finish_worker(p, timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def test_two_processes_two_devices_each(tmp_path):
  images = str(tmp_path / "images")
  et.write_images(images)
  root = str(tmp_path / "cache")
  out = str(tmp_path / "feats_{process}.npz")
  stats = _run_two_processes(dict(images=images, out=out, cache=root,
                                  batch_size_per_device=2, corrupt_and_rerun=True))
  ref = et.reference_features(images)
  names = sorted(os.listdir(images))
  for p in range(2):
    first, rerun = stats[p]
    assert first["device_count"] == 4 and first["process"] == p
    assert (first["num_shards"], first["shards_computed"], first["shards_written"]) == (2, 2, 2)
    # Process 1 corrupted its shard 1: both processes run that step again (the
    # jitted step is collective) but only process 1 rewrites it.
    assert rerun["shards_computed"] == 1 and not rerun["from_complete_entry"]
    assert (rerun["shards_reused"], rerun["shards_written"]) == ((2, 0) if p == 0 else (1, 1))
    # Every process ends with all features, in dataset order.
    fs = features_io.load(out.format(process=p))
    np.testing.assert_allclose(fs.features, ref, atol=1e-5, rtol=0)
    assert list(fs.ids) == names and len(set(fs.ids)) == et.NUM_IMAGES
    assert fs.meta["process_count"] == 2 and fs.meta["device_count"] == 4

  entry = cache_lib.entry_dir(root, et.tiny_key(images))
  manifest = cache_lib.read_manifest(entry)
  assert manifest["status"] == "complete"
  assert sorted((s["process"], s["shard"]) for s in manifest["shards"]) == [
      (0, 0), (0, 1), (1, 0), (1, 1)]
  assert sorted(os.listdir(entry)) == sorted(
      [s["file"] for s in manifest["shards"]] + ["manifest.json"])
  # Shard contents: data.sharding's contiguous blocks, 0..5 and 6..10, read
  # 4 rows per step.
  rows = {}
  for s in manifest["shards"]:
    with np.load(os.path.join(entry, s["file"])) as z:
      rows[(s["process"], s["shard"])] = z["index"].tolist()
  assert rows == {(0, 0): [0, 1, 2, 3], (0, 1): [4, 5],
                  (1, 0): [6, 7, 8, 9], (1, 1): [10]}
  fs = cache_lib.load_entry(entry)
  np.testing.assert_allclose(fs.features, ref, atol=1e-5, rtol=0)
  assert list(fs.ids) == names


def test_initialize_validates_settings(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert parallel.initialize() is False  # one process: nothing to start
  assert parallel.initialize(num_processes=1, process_id=0,
                             coordinator_address="127.0.0.1:1") is False
  with pytest.raises(ValueError, match="needs --coordinator_address"):
    parallel.initialize(num_processes=2)
  with pytest.raises(ValueError, match="--process_id 2 must be in"):
    parallel.initialize("127.0.0.1:1", num_processes=2, process_id=2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
    parallel.initialize()


def test_single_process_collectives_are_identity():
  x = np.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(parallel.allgather(x), x[None])
  parallel.sync("noop")
  assert parallel.allgather(np.array(True)).tolist() == [True]
