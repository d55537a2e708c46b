"""Tests of features.extract: sharded data-parallel extraction equals a direct forward pass.

The reference is ``model.apply`` on the images preprocessed one by one on the
host, outside the extraction pipeline. Several-device runs use a subprocess
(this file run as a script) with forced CPU devices. cache_test.py and
multihost_test.py reuse the tiny backbone and the worker defined here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from sslbench_jax.data import preprocess  # pylint: disable=wrong-import-position
from sslbench_jax.features import cache as cache_lib  # pylint: disable=wrong-import-position
from sslbench_jax.features import extract as extract_lib  # pylint: disable=wrong-import-position
from sslbench_jax.features import image_folder  # pylint: disable=wrong-import-position

NUM_IMAGES = 11  # not a multiple of any global batch used: padding is exercised
PRESET_OVERRIDES = dict(resize=20, crop=16)


class TinyNet(nn.Module):
  """A backbone-contract module: conv, BatchNorm (running stats), pooling, head."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(6, (3, 3), strides=(2, 2), dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
    x = nn.relu(x)
    pooled = x.mean(axis=(1, 2))
    return {"pre_logits": pooled, "grid": x[:, :2, :2, :],
            "logits": nn.Dense(5, dtype=self.dtype)(pooled)}


def tiny_variables() -> dict[str, Any]:
  """Deterministic variables with non-trivial BatchNorm statistics."""
  variables = TinyNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  rng = np.random.RandomState(1)
  stats = variables["batch_stats"]["BatchNorm_0"]
  return {"params": jax.tree.map(np.asarray, variables["params"]),
          "batch_stats": {"BatchNorm_0": {
              "mean": rng.normal(0, 0.1, stats["mean"].shape).astype(np.float32),
              "var": rng.uniform(0.5, 2.0, stats["var"].shape).astype(np.float32)}}}


def tiny_preset() -> preprocess.Preprocess:
  return preprocess.get_preset("imagenet_bilinear", **PRESET_OVERRIDES)


def write_images(directory: str, n: int = NUM_IMAGES, seed: int = 0) -> list[str]:
  """n small JPEGs of different sizes (one grayscale); returns sorted names."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.RandomState(seed)
  names = []
  for i in range(n):
    h, w = 18 + 3 * i, 40 - i
    pixels = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
    img = Image.fromarray(pixels)
    if i == 3:
      img = img.convert("L")
    names.append(f"img_{i:02d}.jpg")
    img.save(os.path.join(directory, names[-1]), quality=90)
  return sorted(names)


def reference_features(directory: str, key: str = "pre_logits") -> np.ndarray:
  """model.apply on images preprocessed one by one (no pipeline, no padding)."""
  preset = tiny_preset()
  names = sorted(os.listdir(directory))
  images = []
  for name in names:
    with Image.open(os.path.join(directory, name)) as img:
      images.append(preset(img))
  out = TinyNet().apply(tiny_variables(), np.stack(images), train=False)[key]
  return np.asarray(out).reshape(len(names), -1)


def tiny_key(directory: str, dtype: str = "float32") -> cache_lib.CacheKey:
  return cache_lib.CacheKey(
      arch="tiny", arch_options={}, weights_sha256="0" * 64,
      dataset=f"folder:{directory}", split="", preprocessing="imagenet_bilinear:16",
      representation="pre_logits", dtype=dtype)


def run_extract(images: str, *, cache: str | None = None, batch_size_per_device: int = 2,
                steps_per_shard: int = 1, dtype: str = "float32",
                representation: str = "pre_logits", **kwargs) -> extract_lib.ExtractResult:
  """extract() on the tiny model and an image folder."""
  return extract_lib.extract(
      TinyNet(), tiny_variables(), image_folder.ImageFolder(images), tiny_preset(),
      representation=representation, dtype=dtype,
      batch_size_per_device=batch_size_per_device, num_threads=2,
      cache_root=cache, key=tiny_key(images, dtype) if cache else None,
      steps_per_shard=steps_per_shard, progress=False, **kwargs)


def worker_env(devices: int | None = None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env["JAX_PLATFORMS"] = "cpu"
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def start_worker(config: dict[str, Any], devices: int | None = None) -> subprocess.Popen:
  """Starts this file as an extraction worker (see ``_worker_main``)."""
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(config)],
                          env=worker_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish_worker(proc: subprocess.Popen, timeout: float = 120) -> list[dict[str, Any]]:
  """Waits for a worker; returns the stats it printed (one per extract call)."""
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-3000:]}"
  return [json.loads(line[6:]) for line in out.splitlines() if line.startswith("STATS ")]


def _worker_main(config: dict[str, Any]) -> None:
  """Subprocess body: optional jax.distributed, extract, save, print stats.

  Config keys: images, out, cache, batch_size_per_device, steps_per_shard,
  kill_after_shards (SIGKILL itself once that many shards are written),
  sleep_after_shard (seconds, to slow a run down for an external kill),
  coordinator/num_processes/process_id, corrupt_and_rerun (multi-process:
  process 1 corrupts its last shard, then every process reruns),
  model_axis_size (extract on ``parallel.make_mesh(model_axis_size)``).
  """
  from sslbench_jax.features import io as features_io  # pylint: disable=g-import-not-at-top
  from sslbench_jax import parallel  # pylint: disable=g-import-not-at-top
  if config.get("coordinator"):
    parallel.initialize(config["coordinator"], config["num_processes"],
                        config["process_id"])
  written = []

  def on_shard(shard):
    written.append(shard)
    if len(written) == config.get("kill_after_shards"):
      os.kill(os.getpid(), 9)
    time.sleep(config.get("sleep_after_shard", 0))

  def once():
    mesh = (parallel.make_mesh(config["model_axis_size"])
            if config.get("model_axis_size") else None)
    result = run_extract(config["images"], cache=config.get("cache"),
                         batch_size_per_device=config["batch_size_per_device"],
                         steps_per_shard=config.get("steps_per_shard", 1),
                         on_shard_written=on_shard, mesh=mesh)
    out = config["out"].format(process=jax.process_index())
    features_io.save(out, result.features)
    print("STATS " + json.dumps(dict(
        result.stats.__dict__, process=jax.process_index(),
        device_count=jax.device_count(), entry_dir=result.entry_dir)), flush=True)
    return result

  result = once()
  if config.get("corrupt_and_rerun"):
    parallel.sync("written")
    if jax.process_index() == 1:
      last = sorted(f for f in os.listdir(result.entry_dir) if "-p00001-" in f)[-1]
      path = os.path.join(result.entry_dir, last)
      data = bytearray(open(path, "rb").read())
      data[len(data) // 2] ^= 0xFF
      open(path, "wb").write(bytes(data))
    parallel.sync("corrupted")
    once()


# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("images"))
  write_images(directory)
  return directory


def check_features(fs, images_dir, atol=1e-5):
  """Features equal the direct pass; ids in dataset order, once each; no labels."""
  ref = reference_features(images_dir)
  np.testing.assert_allclose(fs.features, ref, atol=atol, rtol=0)
  assert list(fs.ids) == sorted(os.listdir(images_dir))  # dataset order, no duplicates
  assert len(set(fs.ids)) == NUM_IMAGES
  np.testing.assert_array_equal(fs.labels, -np.ones(NUM_IMAGES))


@pytest.mark.parametrize("batch_size_per_device", [1, 4, 16])
def test_single_process_matches_direct_apply(images, batch_size_per_device):
  result = run_extract(images, batch_size_per_device=batch_size_per_device)
  check_features(result.features, images)
  meta = result.features.meta
  assert meta["representation"] == "pre_logits" and meta["dtype"] == "float32"
  assert meta["device_count"] == jax.device_count() and meta["process_count"] == 1
  assert {"jax", "flax", "sslbench_jax"} <= set(meta["versions"])


def test_eight_devices_match_direct_apply(images, tmp_path):
  # 8 devices x 1 row: 11 images = one full step + one step with 5 padded rows.
  proc = start_worker(dict(images=images, out=str(tmp_path / "f.npz"),
                           batch_size_per_device=1), devices=8)
  (stats,) = finish_worker(proc)
  assert stats["device_count"] == 8
  from sslbench_jax.features import io as features_io  # pylint: disable=g-import-not-at-top
  fs = features_io.load(str(tmp_path / "f.npz"))
  check_features(fs, images)
  assert fs.meta["device_count"] == 8


def test_eight_devices_on_a_mesh_with_a_model_axis(images, tmp_path):
  # A (data 4, model 2) mesh: rows split 4 ways (variables replicated), so 11
  # images take 3 steps of 4 rows, the last with 1 padded row; same features.
  proc = start_worker(dict(images=images, out=str(tmp_path / "f.npz"), cache=str(tmp_path / "c"),
                           batch_size_per_device=1, steps_per_shard=2,
                           model_axis_size=2), devices=8)
  (stats,) = finish_worker(proc)
  assert stats["device_count"] == 8 and stats["num_shards"] == 2  # 3 steps, 2 per shard
  from sslbench_jax.features import io as features_io  # pylint: disable=g-import-not-at-top
  check_features(features_io.load(str(tmp_path / "f.npz")), images)


def test_float_preprocess_path_matches(images):
  # A plain callable (no uint8 geometry step): float32 pixels are shipped.
  preset = tiny_preset()
  result = extract_lib.extract(
      TinyNet(), tiny_variables(), image_folder.ImageFolder(images),
      lambda img: preset(img), batch_size_per_device=3, progress=False)
  check_features(result.features, images)


def test_multidimensional_representation_is_flattened(images):
  result = run_extract(images, representation="grid", batch_size_per_device=4)
  ref = reference_features(images, key="grid")
  assert result.features.features.shape == (NUM_IMAGES, 2 * 2 * 6)
  np.testing.assert_allclose(result.features.features, ref, atol=1e-5, rtol=0)


def test_bfloat16_compute_is_close(images):
  result = run_extract(images, dtype="bfloat16", batch_size_per_device=4)
  ref = reference_features(images)
  assert result.features.features.dtype == np.float32
  # bf16 has an 8-bit mantissa: ~1e-2 relative error, far from float32's 1e-7.
  err = np.abs(result.features.features - ref).max() / np.abs(ref).max()
  assert 0 < err < 3e-2
  assert result.features.meta["dtype"] == "bfloat16"


def test_registry_dataset_with_skipped_corrupt_image(tmp_path):
  # data.registry's generic "folder" dataset: class sub-folders give labels,
  # the Dataset preprocesses (float32 images), and a corrupt file skipped
  # under on_corrupt="skip" comes back with mask=False and must be dropped.
  from sslbench_jax.data import registry as data_registry  # pylint: disable=g-import-not-at-top
  root = tmp_path / "train"
  for cls in ("cat", "dog"):
    write_images(str(root / cls), n=3 if cls == "cat" else 4, seed=len(cls) + ord(cls[0]))
  (root / "dog" / "img_99.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  ds = data_registry.open_dataset("folder", "train", data_dir=str(tmp_path),
                                  preprocessing=tiny_preset(), on_corrupt="skip")
  assert len(ds) == 8
  result = extract_lib.extract(TinyNet(), tiny_variables(), ds, None,
                               batch_size_per_device=3, progress=False)
  fs = result.features
  kept = [i for i in range(len(ds)) if ds.source.read(i)[2] != "dog/img_99.jpg"]
  expected_ids = [ds.source.read(i)[2] for i in kept]
  assert list(fs.ids) == expected_ids and len(expected_ids) == 7
  np.testing.assert_array_equal(fs.labels, [0, 0, 0, 1, 1, 1, 1])
  assert fs.meta["num_skipped"] == 1 and fs.meta["skipped_indices"] == [7]
  os.remove(root / "dog" / "img_99.jpg")
  ref = np.concatenate([reference_features(str(root / c)) for c in ("cat", "dog")])
  np.testing.assert_allclose(fs.features, ref, atol=1e-5, rtol=0)


def test_corrupt_image_leaves_a_resumable_entry_that_says_so(tmp_path, caplog):
  # Issue 10: a corrupt image stopped `features` cleanly but left a manifest
  # claiming "running". Now the manifest says "interrupted" and why, the
  # shards written before the bad image are kept (checksummed), and the run
  # after the image is fixed resumes from them, says so, and gives the
  # features of a clean run.
  from sslbench_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import registry as data_registry  # pylint: disable=g-import-not-at-top
  root = tmp_path / "data" / "train"
  for cls in ("cat", "dog"):
    write_images(str(root / cls), n=4, seed=len(cls) + ord(cls[0]))
  bad = root / "dog" / "img_02.jpg"
  good_bytes = bad.read_bytes()
  bad.write_bytes(good_bytes[:40])  # truncated JPEG
  cache = str(tmp_path / "cache")
  key = cache_lib.CacheKey("tinynet", {}, "0" * 64, "folder", "train",
                           "imagenet_bilinear", "pre_logits", "float32")

  def run():
    ds = data_registry.open_dataset("folder", "train", data_dir=str(tmp_path / "data"),
                                    preprocessing=tiny_preset())
    return extract_lib.extract(TinyNet(), tiny_variables(), ds, None,
                               batch_size_per_device=1, steps_per_shard=1,
                               num_threads=1, prefetch=1, cache_root=cache, key=key,
                               progress=False)

  with pytest.raises(images_lib.CorruptImageError, match="img_02.jpg"):
    run()
  entry = cache_lib.entry_dir(cache, key)
  manifest = cache_lib.read_manifest(entry)
  assert manifest["status"] == "interrupted", manifest["status"]
  assert "CorruptImageError" in manifest["error"] and "img_02.jpg" in manifest["error"]
  on_disk = [n for n in os.listdir(entry) if n.endswith(".npz")]
  assert on_disk  # the shards before the bad image
  with pytest.raises(ValueError, match="incomplete"):
    cache_lib.load_entry(entry)  # never mistaken for a finished entry

  bad.write_bytes(good_bytes)
  caplog.clear()
  with caplog.at_level("INFO", logger="absl"):
    result = run()
  assert "resuming an interrupted extraction; it stopped on: CorruptImageError" in (
      caplog.text)
  assert result.stats.shards_reused == len(on_disk) > 0
  assert result.stats.shards_computed == result.stats.num_shards - len(on_disk)
  assert cache_lib.read_manifest(entry)["status"] == "complete"
  ref = np.concatenate([reference_features(str(root / c)) for c in ("cat", "dog")])
  np.testing.assert_allclose(result.features.features, ref, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(result.features.labels, [0] * 4 + [1] * 4)
  np.testing.assert_array_equal(cache_lib.load_entry(entry).features,
                                result.features.features)


class _NoDtypeNet(nn.Module):
  """No ``dtype`` field: bfloat16 extraction casts the variables instead."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return {"pre_logits": nn.Dense(4)(nn.Conv(5, (3, 3))(x).mean(axis=(1, 2)))}


def test_bfloat16_for_a_module_without_dtype_field(images):
  model = _NoDtypeNet()
  variables = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(2),
                                                  jnp.zeros((1, 16, 16, 3))))
  kwargs = dict(batch_size_per_device=4, progress=False)
  f32 = extract_lib.extract(model, variables, image_folder.ImageFolder(images),
                            tiny_preset(), **kwargs).features.features
  bf16 = extract_lib.extract(model, variables, image_folder.ImageFolder(images),
                             tiny_preset(), dtype="bfloat16", **kwargs).features.features
  preset = tiny_preset()
  batch = np.stack([preset(image_folder.ImageFolder(images).get(i)["image"])
                    for i in range(NUM_IMAGES)])
  np.testing.assert_allclose(f32, model.apply(variables, batch)["pre_logits"],
                             atol=1e-5, rtol=0)
  err = np.abs(bf16 - f32).max() / np.abs(f32).max()
  assert 0 < err < 3e-2


def test_bad_arguments(images):
  with pytest.raises(ValueError, match="Unknown representation 'nope'.*pre_logits"):
    run_extract(images, representation="nope")
  with pytest.raises(ValueError, match="Unknown dtype"):
    run_extract(images, dtype="float16")
  with pytest.raises(ValueError, match="needs a CacheKey"):
    extract_lib.extract(TinyNet(), tiny_variables(), image_folder.ImageFolder(images),
                        tiny_preset(), cache_root="/tmp/x", progress=False)


def test_variable_size_preprocessing_is_rejected(images):
  preset = preprocess.get_preset("imagenet_bilinear", resize=16, crop=None)
  with pytest.raises(ValueError, match="fixed-size images"):
    extract_lib.extract(TinyNet(), tiny_variables(), image_folder.ImageFolder(images),
                        preset, batch_size_per_device=4, progress=False)


if __name__ == "__main__":
  _worker_main(json.loads(sys.argv[1]))
