"""Process decode workers on the data layer's sources: TFDS (mocked) and a folder.

`decode_workers_test.py` covers `features.image_folder.ImageFolder` (raw
images, host geometry). Here the source is a `data.dataset.Dataset` opened
from the registry, which decodes and preprocesses inside `get` (float32
images), as `features --dataset` and `evaluate` use it: a TFDS split under
`tfds.testing.mock_data` (encoded JPEG bytes of varied sizes, one grayscale,
one corrupt and skipped), TFDS's own random mock examples, and the generic
`folder` dataset. Reference: `Dataset.get(i)` called one by one, no pipeline.
The process workers are forked inside the mock, so they read the same
patched data source.
"""

import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import extract_test as et
from sslbench_jax.data import registry as data_registry
from sslbench_jax.features import _pipeline
from sslbench_jax.features import extract as extract_lib

NUM = 11   # not a multiple of the rows per step: the last step is padded
CORRUPT = 6


def _jpeg(rs, k):
  size = (24 + 7 * k, 40 - 2 * k)   # varied sizes and aspect ratios
  pixels = rs.randint(0, 256, size + (3,)).astype(np.uint8)
  img = Image.fromarray(pixels)
  if k == 3:
    img = img.convert("L")   # grayscale: the preset converts it to RGB
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _examples(n=NUM):
  rs = np.random.RandomState(0)
  out = []
  for k in range(n):
    data = b"\xff\xd8 not a jpeg" if k == CORRUPT else _jpeg(rs, k)
    out.append({"image": data, "label": int(rs.randint(0, 100)), "id": f"test_{k:03d}"})
  return out


def _collect(ds, backend, workers, rows=4, depth=1):
  """The pipeline's batches over all of ``ds`` (positions 0..n-1, -1 pads)."""
  load = _pipeline.example_loader(ds, None)
  first = load(0)[0]
  steps = -(-len(ds) // rows)
  plan = np.full(steps * rows, -1)
  plan[:len(ds)] = np.arange(len(ds))
  plan = plan.reshape(steps, rows)
  # depth 1: the process ring (2 steps) is reused over the 3 steps
  return list(_pipeline.device_batches(
      range(steps), lambda s: plan[s], load, first.shape, first.dtype,
      lambda x: x.copy(), workers, depth=depth, decode_backend=backend)), plan


def _check(ds, skipped=()):
  """threads == processes (1 and 2 workers) == Dataset.get one by one."""
  threads, plan = _collect(ds, "threads", 2)
  for workers in (1, 2):
    procs, _ = _collect(ds, "processes", workers)
    assert len(procs) == len(threads)
    for p, t in zip(procs, threads):
      assert (p.step, p.labels, p.ids, p.skipped) == (t.step, t.labels, t.ids, t.skipped)
      np.testing.assert_array_equal(p.keep, t.keep)
      assert p.device.dtype == t.device.dtype == np.float32
      np.testing.assert_array_equal(p.device, t.device)
  kept = []
  for batch in threads:
    for row, i in enumerate(plan[batch.step]):
      if i < 0 or i in skipped:
        assert not batch.keep[row] and not batch.device[row].any()
        continue
      ref = ds.get(int(i))
      np.testing.assert_array_equal(batch.device[row], ref["image"])
      kept.append((ref["id"], ref["label"]))
  assert [(i, l) for b in threads for i, l in zip(b.ids, b.labels)] == kept
  assert [s for b in threads for s in b.skipped] == list(skipped)
  return threads


def test_tfds_mock_jpeg_bytes_processes_equal_threads():
  data = _examples()
  with tfds.testing.mock_data(as_data_source_fn=lambda builder, split, **kw: data):
    ds = data_registry.open_dataset("cifar100", "test", preprocessing="smoke_32",
                                    on_corrupt="skip")
    assert len(ds) == NUM
    batches = _check(ds, skipped=(CORRUPT,))
  assert batches[0].device.shape == (4, 32, 32, 3)
  assert batches[0].ids == ["test_000", "test_001", "test_002", "test_003"]
  assert batches[0].labels == [e["label"] for e in data[:4]]


def test_tfds_default_mock_examples_processes_equal_threads():
  # TFDS's generated examples (decoded uint8 arrays; the source falls back to them)
  with tfds.testing.mock_data(num_examples=7):
    ds = data_registry.open_dataset("cifar100", "test", preprocessing="smoke_32")
    _check(ds)


def _write_folder(root, split="test"):
  rs = np.random.RandomState(1)
  paths = []
  for c, cls in enumerate(("ant", "bee", "cat")):
    os.makedirs(os.path.join(root, split, cls))
    for j in range(3 + c):
      path = os.path.join(root, split, cls, f"{j:02d}.jpg")
      with open(path, "wb") as f:
        f.write(_jpeg(rs, c + j))
      paths.append(path)
  return paths


def test_folder_dataset_processes_equal_threads(tmp_path):
  paths = _write_folder(str(tmp_path))
  with open(paths[4], "wb") as f:
    f.write(b"\xff\xd8 truncated")
  ds = data_registry.open_dataset("folder", "test", data_dir=str(tmp_path),
                                  preprocessing="smoke_32", on_corrupt="skip")
  assert len(ds) == 12
  batches = _check(ds, skipped=(4,))
  # class sub-folders in sorted order, files sorted within each
  assert [l for b in batches for l in b.labels] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]


def test_extract_on_tfds_mock_same_features_with_processes():
  data = _examples()
  feats = {}
  with tfds.testing.mock_data(as_data_source_fn=lambda builder, split, **kw: data):
    ds = data_registry.open_dataset("cifar100", "test", preprocessing="smoke_32",
                                    on_corrupt="skip")
    for backend in ("threads", "processes"):
      feats[backend] = extract_lib.extract(
          et.TinyNet(), et.tiny_variables(), ds, None, batch_size_per_device=4,
          num_threads=2, progress=False, decode_backend=backend).features
  a, b = feats["threads"], feats["processes"]
  assert a.features.shape == (NUM - 1, 6) and a.features.any()
  np.testing.assert_array_equal(b.features, a.features)
  np.testing.assert_array_equal(b.labels, a.labels)
  assert list(b.ids) == list(a.ids) == [e["id"] for k, e in enumerate(data) if k != CORRUPT]
  assert b.meta["skipped_indices"] == a.meta["skipped_indices"] == [CORRUPT]
