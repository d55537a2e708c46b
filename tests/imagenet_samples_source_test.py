"""The flat ``<wnid>_*.JPEG`` folder source (the demo's real ImageNet images)."""

import os

import pytest

from sslbench_jax.data import registry
from conftest import SHARED


def test_labels_are_sorted_wnid_positions(imagenet_samples_dir):
  with open(os.path.join(SHARED, "data", "imagenet_meta", "imagenet_synsets.txt")) as f:
    wnids = [line.split()[0] for line in f if line.strip()]
  ds = registry.open_dataset("imagenet_samples", "test", data_dir=imagenet_samples_dir)
  assert len(ds) == 1000
  labels = sorted(ds.source.read(i)[1] for i in range(len(ds)))
  assert labels == list(range(1000))  # one image per class
  path, label, name = ds.source.read(123)
  assert wnids[label] == name.split("_")[0]
  ex = ds.get(123)
  assert ex["image"].shape == (224, 224, 3) and ex["label"] == label


def test_rejects_files_without_wnid(tmp_path):
  (tmp_path / "cat.jpg").write_bytes(b"x")
  with pytest.raises(ValueError, match="wnid"):
    registry.open_dataset("imagenet_samples", "test", data_dir=str(tmp_path))
