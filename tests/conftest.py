"""Shared test fixtures: the ../shared reference data, tmp dirs."""

import os

import pytest

SHARED = os.environ.get(
    "SSLBENCH_SHARED",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))
IMAGENET_SAMPLES = os.path.join(SHARED, "data", "imagenet_samples")


@pytest.fixture
def imagenet_samples_dir():
  """The 1000 real ImageNet images (one per class); skips where absent."""
  if not os.path.isdir(IMAGENET_SAMPLES):
    pytest.skip(f"real ImageNet samples not found at {IMAGENET_SAMPLES} "
                "(set SSLBENCH_SHARED to the shared/ folder)")
  return IMAGENET_SAMPLES
