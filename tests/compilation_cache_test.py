"""The session's persistent XLA compilation cache (tests/conftest.py) changes no number."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _init(key):
  k1, k2 = jax.random.split(key)
  return jax.random.normal(k1, (3, 3, 3, 8)), jax.random.normal(k2, (8 * 16 * 16, 10))


def _apply(params, x):  # a conv + ReLU + dense, as a backbone and a head
  kernel, dense = params
  y = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.tanh(jax.nn.relu(y).reshape(x.shape[0], -1) @ dense)


def compute() -> np.ndarray:
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  params = jax.jit(_init)(jax.random.PRNGKey(0))
  return np.asarray(jax.jit(_apply)(params, x))


def _run(tmp_path, name, env):
  """``compute()`` in a fresh process; returns its output and its compile log."""
  out = str(tmp_path / f"{name}.npy")
  program = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
             "import numpy as np; from compilation_cache_test import compute; "
             "np.save(sys.argv[1], compute())")
  proc = subprocess.run([sys.executable, "-c", program, out], check=True,
                        env=dict(env, JAX_LOG_COMPILES="1"),
                        capture_output=True, text=True, timeout=900)
  return np.load(out), proc.stderr


def test_cached_executables_give_the_same_numbers(tmp_path):
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    pytest.skip("no compilation cache in this session (SSLBENCH_TEST_JAX_CACHE=0)")
  cache = tmp_path / "cache"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cold, log = _run(tmp_path, "cold", env)     # compiles, writes the cache
  assert "Persistent compilation cache hit for 'jit__apply'" not in log
  entries = sorted(p for p in os.listdir(cache) if p.endswith("-cache"))
  assert any(p.startswith("jit__apply") for p in entries), entries
  warm, log = _run(tmp_path, "warm", env)     # loads the executables
  assert "Persistent compilation cache hit for 'jit__init'" in log
  assert "Persistent compilation cache hit for 'jit__apply'" in log
  # and compiled in this process with no persistent cache at all
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    fresh = compute()
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
  np.testing.assert_array_equal(warm, cold)
  np.testing.assert_array_equal(fresh, cold)
  assert np.isfinite(cold).all() and cold.std() > 0
