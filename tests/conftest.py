"""Shared test fixtures: the ../shared reference data, tmp dirs; one XLA compilation cache per session."""

import os
import shutil
import sys
import tempfile

import pytest

SHARED = os.environ.get(
    "SSLBENCH_SHARED",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))
IMAGENET_SAMPLES = os.path.join(SHARED, "data", "imagenet_samples")

# The suite compiles the same programs many times over (the same tiny models
# and probes in many tests, in xdist workers and in the CLI subprocesses tests
# start): JAX's persistent compilation cache, in a fresh folder per session,
# turns the repeats into loads of the executable XLA already built (same
# program, same flags, same machine: same code, so the same numbers). Set
# JAX_COMPILATION_CACHE_DIR to use another folder, SSLBENCH_TEST_JAX_CACHE=0
# to compile everything afresh.
_CACHE_ENV = {
    # programs that compile faster than this are not worth a file
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    # a size limit turns on jax's file lock: concurrent processes never read
    # a half-written entry
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),
}


def pytest_configure(config):
  """Points every process of the session (workers, subprocesses) at one cache folder."""
  if (os.environ.get("SSLBENCH_TEST_JAX_CACHE", "1") == "0"
      or os.environ.get("JAX_COMPILATION_CACHE_DIR")):
    return  # disabled, or set by the user or by the xdist controller
  try:
    import filelock  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return  # jax needs it for the size limit (the lock); without it, no cache
  folder = tempfile.mkdtemp(prefix="sslbench-test-jax-cache-")
  config.sslbench_jax_cache = folder
  os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
  for key, value in _CACHE_ENV.items():
    os.environ.setdefault(key, value)
  if "jax" in sys.modules:  # imported before this hook: set its config too
    jax = sys.modules["jax"]
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_compilation_cache_max_size",
                      int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))


def pytest_unconfigure(config):
  folder = getattr(config, "sslbench_jax_cache", None)
  if folder:
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def imagenet_samples_dir():
  """The 1000 real ImageNet images (one per class); skips where absent."""
  if not os.path.isdir(IMAGENET_SAMPLES):
    pytest.skip(f"real ImageNet samples not found at {IMAGENET_SAMPLES} "
                "(set SSLBENCH_SHARED to the shared/ folder)")
  return IMAGENET_SAMPLES
