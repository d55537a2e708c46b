"""Tests of sslbench_jax.parallel: mesh axes, the exact pad + mask predict, writers.

Several-device checks run in a subprocess with forced CPU devices
(``multiprocess_util``). ``predict`` is compared with ``apply_fn`` on the whole
input at once on one device; inputs and weights are small integers, so every
float32 sum is exact and the outputs must be equal bit for bit whatever the
batching, padding or device count.
"""

from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest

import multiprocess_util
from sslbench_jax import parallel


def test_mesh_axes_and_shape_on_8_devices():
  multiprocess_util.run_on_devices(textwrap.dedent("""
    import jax, pytest
    from sslbench_jax import parallel
    assert parallel.AXES == ("data", "model")
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": 8, "model": 1}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert parallel.local_data_size(mesh) == 8
    fsdp = parallel.make_mesh(model_axis_size=2)
    assert dict(fsdp.shape) == {"data": 4, "model": 2}
    assert parallel.local_data_size(fsdp) == 4
    sub = parallel.make_mesh(devices=jax.devices()[:3])
    assert dict(sub.shape) == {"data": 3, "model": 1}
    for bad in (0, 3):
      with pytest.raises(ValueError, match=f"model_axis_size={bad}"):
        parallel.make_mesh(model_axis_size=bad)
    print("OK")
  """), devices=8)


_PREDICT_CODE = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np, pytest
  from sslbench_jax import parallel

  rng = np.random.default_rng(0)
  w = rng.integers(-3, 4, size=(5, 3)).astype(np.float32)
  sizes = [6, 6, 6, 3]   # 21 rows: not a multiple of 8 devices, last batch short
  xs = [rng.integers(-4, 5, size=(n, 5)).astype(np.float32) for n in sizes]
  full = np.concatenate(xs)

  def apply_fn(p, x):
    h = jnp.maximum(x @ p["w"], 0) + p["b"]
    return {"h": h, "top": jnp.argmax(h, axis=1)}

  params = {"w": w, "b": np.float32([1, 2, 3])}
  ref = jax.device_get(jax.jit(apply_fn)(params, full))   # one device, no padding

  for model_axis in (1, 2):
    mesh = parallel.make_mesh(model_axis_size=model_axis)
    out = parallel.predict(apply_fn, params, xs, mesh=mesh)
    assert out["h"].shape == (21, 3) and out["top"].shape == (21,)
    np.testing.assert_array_equal(out["h"], ref["h"])
    np.testing.assert_array_equal(out["top"], ref["top"])

  # FSDP-style parameters (columns split over the model axis) stay where they are.
  fsdp = parallel.make_mesh(model_axis_size=2)
  w4 = rng.integers(-3, 4, size=(5, 4)).astype(np.float32)
  split = jax.device_put(w4, jax.sharding.NamedSharding(
      fsdp, jax.sharding.PartitionSpec(None, parallel.MODEL_AXIS)))
  assert parallel.replicate(split, fsdp) is split
  np.testing.assert_array_equal(
      parallel.predict(lambda p, x: x @ p, split, xs, mesh=fsdp),
      jax.device_get(jax.jit(lambda p, x: x @ p)(w4, full)))

  mesh = parallel.make_mesh()
  # Masked rows are dropped as well as the padding.
  masks = [np.arange(len(x)) % 3 != 1 for x in xs]
  out = parallel.predict(apply_fn, params, list(zip(xs, masks)), mesh=mesh, masked=True)
  np.testing.assert_array_equal(out["h"], ref["h"][np.concatenate(masks)])
  # A fixed `rows` larger than the batches: same numbers.
  h = parallel.predict(lambda p, x: apply_fn(p, x)["h"], params, xs, mesh=mesh, rows=16)
  np.testing.assert_array_equal(h, ref["h"])
  # Placed parameters are used as they are.
  placed = parallel.replicate(params, mesh)
  assert parallel.replicate(placed, mesh)["w"] is placed["w"]
  np.testing.assert_array_equal(
      parallel.predict(apply_fn, placed, xs, mesh=mesh)["h"], ref["h"])
  assert parallel.predict(apply_fn, params, [], mesh=mesh) is None

  with pytest.raises(ValueError, match="a batch of 9 rows exceeds rows=8"):
    parallel.predict(apply_fn, params, [full[:8], full[:9]], mesh=mesh)
  with pytest.raises(ValueError, match="not a multiple"):
    parallel.predict(apply_fn, params, xs, mesh=mesh, rows=12)
  with pytest.raises(ValueError, match="mask of shape"):
    parallel.predict(apply_fn, params, [(xs[0], masks[1][:2])], mesh=mesh, masked=True)
  print("OK")
""")


def test_predict_exact_on_8_devices_padding_dropped():
  multiprocess_util.run_on_devices(_PREDICT_CODE, devices=8)


_TWO_PROCESS_CODE = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  import jax, jax.numpy as jnp, numpy as np
  from sslbench_jax import parallel
  address, pid = sys.argv[1], int(sys.argv[2])
  assert parallel.initialize(address, 2, pid)
  assert parallel.is_writer() == (pid == 0)
  assert parallel.allgather(np.array([pid, 7])).tolist() == [[0, 7], [1, 7]]
  assert parallel.broadcast(np.array([pid + 5])).tolist() == [5]
  assert parallel.process_rows(8) == slice(4 * pid, 4 * pid + 4)
  mesh = parallel.make_mesh()
  assert dict(mesh.shape) == {"data": 4, "model": 1} and parallel.local_data_size(mesh) == 2
  rng = np.random.default_rng(0)
  w = rng.integers(-3, 4, size=(4, 2)).astype(np.float32)
  data = rng.integers(-4, 5, size=(13, 4)).astype(np.float32)
  # Uneven shares: process 0 has 3 batches (9 rows), process 1 two (4 rows).
  mine = [data[0:3], data[3:6], data[6:9]] if pid == 0 else [data[9:12], data[12:13]]
  fn = lambda p, x: x @ p
  out = parallel.predict(fn, w, mine, mesh=mesh)
  np.testing.assert_array_equal(out, np.concatenate(mine) @ w)
  parallel.sync("done")
  print("OK")
""")


def test_predict_two_processes_uneven_batches():
  multiprocess_util.run_two_processes(_TWO_PROCESS_CODE)


def test_is_writer_single_process():
  assert jax.process_count() == 1
  assert parallel.is_writer()
  assert parallel.process_rows(6) == slice(0, 6)
  np.testing.assert_array_equal(parallel.broadcast(np.arange(3)), np.arange(3))


def test_process_rows_rejects_uneven_split(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert parallel.process_rows(9) == slice(3, 6)
  with pytest.raises(ValueError, match="global batch 8 is not divisible by the 3"):
    parallel.process_rows(8)
