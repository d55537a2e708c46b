"""Process decode workers: the same pixels, in the same order, as the threads.

Reference: each image decoded and preprocessed on its own (PIL + the preset,
no pipeline). Generated JPEGs of different sizes (one grayscale, one corrupt
or masked), and the real ImageNet samples where ../shared is present.
"""

import os

import numpy as np
import pytest
from PIL import Image

import extract_test as et
from sslbench_jax.data import images as images_lib
from sslbench_jax.data import preprocess
from sslbench_jax.features import _pipeline
from sslbench_jax.features import image_folder

SAMPLES = os.path.join(et.ROOT, "..", "shared", "data", "imagenet_samples")


class _Masked:
  """An ImageFolder whose example 4 is masked out (a source-skipped example)."""

  def __init__(self, folder):
    self.folder = folder

  def __len__(self):
    return len(self.folder)

  def get(self, i):
    ex = dict(self.folder.get(i), label=i % 3)
    if i == 4:
      ex["mask"] = False
    return ex


def _positions(n, rows):
  """Steps of `rows` positions over n examples, the last padded with -1."""
  steps = -(-n // rows)
  pos = np.full(steps * rows, -1)
  pos[:n] = np.arange(n)
  return pos.reshape(steps, rows)


def _collect(source, pixels_fn, backend, workers, rows=4, depth=2):
  load = _pipeline.example_loader(source, pixels_fn)
  first = load(0)[0]
  plan = _positions(len(source), rows)
  out = list(_pipeline.device_batches(
      range(len(plan)), lambda s: plan[s], load, first.shape, first.dtype,
      lambda x: x.copy(), workers, depth=depth, decode_backend=backend))
  return out, plan


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.step == y.step
    np.testing.assert_array_equal(x.positions, y.positions)
    np.testing.assert_array_equal(x.keep, y.keep)
    assert x.labels == y.labels and x.ids == y.ids and x.skipped == y.skipped
    assert x.device.dtype == y.device.dtype
    np.testing.assert_array_equal(x.device, y.device)


@pytest.mark.parametrize("workers", [1, 2])
def test_processes_give_the_threads_pixels_in_order(tmp_path, workers):
  directory = str(tmp_path / "img")
  et.write_images(directory, n=13)
  folder = image_folder.ImageFolder(directory)
  source = _Masked(folder)
  geometry = preprocess.get_preset("imagenet_bilinear", resize=40, crop=32).geometry
  # depth 1: the ring of 2 steps is reused 3 times over 4 steps
  threads, plan = _collect(source, geometry, "threads", 2, depth=1)
  procs, _ = _collect(source, geometry, "processes", workers, depth=1)
  _assert_same(procs, threads)
  # ... and both are the images decoded one by one, in plan order.
  for batch in procs:
    for row, p in enumerate(plan[batch.step]):
      if p < 0 or p == 4:
        assert not batch.keep[row] and not batch.device[row].any()
        continue
      with Image.open(os.path.join(directory, folder.files[p])) as img:
        np.testing.assert_array_equal(batch.device[row], geometry(img))
  assert procs[1].skipped == [4] and procs[0].labels == [0, 1, 2, 0]
  assert [i for b in procs for i in b.ids] == [f for k, f in enumerate(folder.files)
                                               if k != 4]


def test_float_pixels_and_dtype(tmp_path):
  directory = str(tmp_path / "img")
  et.write_images(directory, n=5)
  folder = image_folder.ImageFolder(directory)
  preset = et.tiny_preset()
  fn = lambda img: np.asarray(preset(img), np.float32)
  threads, _ = _collect(folder, fn, "threads", 1, rows=2)
  procs, _ = _collect(folder, fn, "processes", 2, rows=2)
  _assert_same(procs, threads)
  assert procs[0].device.dtype == np.float32


def test_errors_surface_like_the_threads(tmp_path):
  directory = str(tmp_path / "img")
  et.write_images(directory, n=6)
  with open(os.path.join(directory, "img_02.jpg"), "wb") as f:
    f.write(b"\xff\xd8 not a jpeg")
  folder = image_folder.ImageFolder(directory)
  geometry = preprocess.get_preset("imagenet_bilinear", resize=40, crop=32).geometry
  for backend in ("threads", "processes"):
    with pytest.raises(images_lib.CorruptImageError, match="img_02.jpg"):
      _collect(folder, geometry, backend, 2, rows=2)
  # variable-size output (no crop) is rejected with the example named
  sizes = lambda img: np.asarray(img.convert("RGB"))
  for backend in ("threads", "processes"):
    with pytest.raises(ValueError, match=r"example 1 \(img_01.jpg\) preprocesses to shape"):
      _collect(_Ok(folder), sizes, backend, 2, rows=2)
  with pytest.raises(ValueError, match="decode_backend"):
    _collect(folder, geometry, "fibers", 2)


class _Ok:
  """The folder without its corrupt image."""

  def __init__(self, folder):
    self.folder = folder
    self.keep = [k for k, f in enumerate(folder.files) if f != "img_02.jpg"]

  def __len__(self):
    return len(self.keep)

  def get(self, i):
    return self.folder.get(self.keep[i])


@pytest.mark.skipif(not os.path.isdir(SAMPLES), reason="../shared/data/imagenet_samples absent")
def test_real_imagenet_samples_identical(tmp_path):
  folder = image_folder.ImageFolder(SAMPLES)
  folder.files = folder.files[:24]   # real JPEGs of varied sizes
  geometry = preprocess.get_preset("imagenet_bilinear").geometry
  threads, _ = _collect(folder, geometry, "threads", 2, rows=8)
  procs, _ = _collect(folder, geometry, "processes", 2, rows=8)
  _assert_same(procs, threads)
  assert procs[0].device.shape == (8, 224, 224, 3) and procs[0].device.any()


def test_extract_with_processes_matches_direct_apply(tmp_path):
  directory = str(tmp_path / "img")
  et.write_images(directory)
  result = et.run_extract(directory, batch_size_per_device=4,
                          decode_backend="processes")
  et.check_features(result.features, directory)
  s = result.stats.input
  assert set(s) == {"input_wait_seconds", "compute_seconds", "input_bound"}
  assert 0 <= s["input_wait_seconds"] and 0 <= s["compute_seconds"]
  assert s["input_wait_seconds"] + s["compute_seconds"] <= result.stats.seconds + 1e-3
  with pytest.raises(ValueError, match="decode_backend"):
    et.run_extract(directory, decode_backend="fibers")


def test_input_timer_summary():
  t = _pipeline.InputTimer()
  t.wait_seconds, t.total_seconds = 3.0, 4.0
  assert t.summary() == dict(input_wait_seconds=3.0, compute_seconds=1.0,
                             input_bound=True)
  t.wait_seconds = 1.0
  assert t.summary()["input_bound"] is False


def test_cli_processes_record_whether_input_bound(tmp_path):
  """`features --decode_backend processes`: same features as threads; the --out
  meta and the summary say whether the run waited for input."""
  import json
  import subprocess
  import sys

  import jax
  import jax.numpy as jnp
  from sslbench_jax.backbones import registry
  from sslbench_jax.backbones import weights
  from sslbench_jax.features import io as features_io

  directory = str(tmp_path / "img")
  et.write_images(directory, n=5)
  opts = {"width": 32, "depth": 1, "num_heads": 2}
  model = registry.create_model("vit_small_patch16", **opts)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  path = str(tmp_path / "w.npz")
  weights.save_variables(path, jax.tree.map(np.asarray, variables),
                         {"arch": "vit_small_patch16", "arch_options": opts})
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env["JAX_PLATFORMS"] = "cpu"
  feats, summaries = {}, {}
  for backend in ("threads", "processes"):
    out = str(tmp_path / f"{backend}.npz")
    proc = subprocess.run(
        [sys.executable, "-m", "sslbench_jax.cli", "features", "--noprogress",
         "--weights", path, "--images", directory, "--out", out,
         "--batch_size_per_device", "2", "--num_threads", "2",
         "--decode_backend", backend], cwd=et.ROOT, env=env, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "for decoded batches (2 %s)" % backend in proc.stderr
    summaries[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    feats[backend] = features_io.load(out)
  np.testing.assert_array_equal(feats["processes"].features, feats["threads"].features)
  assert list(feats["processes"].ids) == list(feats["threads"].ids)
  for backend in ("threads", "processes"):
    meta = feats[backend].meta["input_pipeline"]
    assert meta["decode_backend"] == backend and isinstance(meta["input_bound"], bool)
    assert meta["input_wait_seconds"] >= 0 and meta["compute_seconds"] > 0
    assert summaries[backend]["input_pipeline"]["input_bound"] == meta["input_bound"]
  bad = subprocess.run(
      [sys.executable, "-m", "sslbench_jax.cli", "features", "--weights", path,
       "--images", directory, "--out", str(tmp_path / "x.npz"),
       "--decode_backend", "fibers"], cwd=et.ROOT, env=env, capture_output=True,
      text=True, timeout=120)
  assert bad.returncode == 2 and not os.path.exists(tmp_path / "x.npz")
