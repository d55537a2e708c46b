"""Linear probe with its training features sharded over the devices or streamed.

Exactness: the same mini-batches (so the same heads, selected config and test
scores up to float summation order) on 1 device, 8 devices, 2 processes, and
with the features streamed from the host in chunks.
"""

import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from sslbench_jax.probes import _data_layout
from sslbench_jax.probes import linear
import multiprocess_util


def _data(seed, n=203, dim=12, classes=5):
  rng = np.random.default_rng(seed)
  centres = rng.normal(scale=1.5, size=(classes, dim))
  y = rng.integers(0, classes, n)
  return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def test_local_tables_hold_each_batch_by_owner(monkeypatch):
  """Every step's rows, regrouped by the device owning them, in batch order."""
  n, b, nd = 203, 37, 8
  order = np.random.default_rng(0).permutation(n)
  labels = np.arange(n) % 7
  steps = -(-n // b)
  layout = _data_layout.plan(n, steps, b, nd, 48, None)
  rows = layout.rows_per_device
  assert layout.mode == "resident" and rows == 26

  # The tables are built on the host; read them before they are transferred.
  monkeypatch.setattr(_data_layout, "_put_table", lambda t, mesh: t)
  idx, y, mask = _data_layout.local_tables(order, labels, layout, None)
  cap = idx.shape[1] // nd
  assert cap % 8 == 0
  idx, y, mask = (a.reshape(steps, nd, cap) for a in (idx, y, mask))
  for t in range(steps):
    batch = order[t * b:(t + 1) * b]
    for d in range(nd):
      mine = [int(r) for r in batch if r // rows == d]   # reference: a plain loop
      got = (idx[t, d][mask[t, d]] + d * rows).tolist()
      assert got == mine
      assert y[t, d][mask[t, d]].tolist() == [int(labels[r]) for r in mine]
      assert not mask[t, d, len(mine):].any()


def test_put_rows_gives_each_device_one_block():
  x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  a = _data_layout.put_rows(x, 12, mesh)
  assert a.shape == (12, 3)
  np.testing.assert_array_equal(np.asarray(a)[:10], x)
  np.testing.assert_array_equal(np.asarray(a)[10:], 0)


def test_plan_streams_only_over_budget():
  row = 2048 * 4
  fits = _data_layout.plan(200_000, 196, 1024, 8, row, 25_000 * row)
  assert fits.mode == "resident" and fits.device_bytes == 25_000 * row
  streamed = _data_layout.plan(200_000, 196, 1024, 8, row, 10_000 * row)
  assert streamed.mode == "streamed"
  # two chunks of whole steps (128 rows per device each) fit the budget
  assert streamed.chunk_steps == 10_000 // 2 // 128
  assert streamed.device_bytes <= 10_000 * row
  with pytest.raises(ValueError, match="device_budget_bytes"):
    x, y = _data(0, n=20)
    linear.train({"x": x}, y, 5, [linear.HeadConfig("x", 0.1)],
                 device_budget_bytes=0)


@pytest.mark.parametrize("budget_rows", [40, 150])
def test_streamed_equals_resident(budget_rows):
  """Chunks of 1 step and of 3 steps (37-row batches), BN and AdamW heads."""
  x, y = _data(1)
  feats = {"a": x, "b": x[:, :6] ** 2}
  configs = (linear.grid(["a", "b"], [0.05, 0.4], [1e-3])
             + linear.grid(["a"], [0.01], [0.05], optimizers=["adamw"]))
  tc = linear.TrainConfig(epochs=3, batch_size=37, warmup_epochs=1, seed=2)
  resident = linear.train(feats, y, 5, configs, tc, progress=False)
  row_bytes = (12 + 6) * 4
  streamed = linear.train(feats, y, 5, configs, tc, progress=False,
                          device_budget_bytes=budget_rows * row_bytes)
  for i in range(len(configs)):
    assert np.abs(resident.weights[i]).max() > 0.05  # trained
    np.testing.assert_allclose(streamed.weights[i], resident.weights[i], atol=1e-6)
    np.testing.assert_allclose(streamed.biases[i], resident.biases[i], atol=1e-6)
  for s in resident.bn_stats:
    for a, b in zip(resident.bn_stats[s], streamed.bn_stats[s]):
      np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


_EIGHT_DEVICES = textwrap.dedent("""
    import numpy as np, jax
    from sslbench_jax.probes import _data_layout, linear
    assert jax.device_count() == 8
    rng = np.random.default_rng(5)
    centres = rng.normal(scale=1.0, size=(6, 16))
    y = rng.integers(0, 6, 301)
    x = (centres[y] + rng.normal(size=(301, 16))).astype(np.float32)
    yt = rng.integers(0, 6, 97)
    xt = (centres[yt] + rng.normal(size=(97, 16))).astype(np.float32)
    configs = linear.grid(["x"], [0.01, 0.1, 1.0], [0.0, 1e-2], batchnorm=[False, True])
    tc = linear.TrainConfig(epochs=3, batch_size=45, warmup_epochs=1, seed=3)
    runs = {}
    for name, kw in (("one", dict(devices=jax.devices()[:1])),
                     ("eight", {}),
                     ("eight_streamed", dict(device_budget_bytes=30 * 16 * 4))):
      runs[name] = linear.fit_select({"x": x}, y, {"x": xt}, yt, 6, configs, tc,
                              progress=False, **kw)
    ref = runs["one"]
    for name, r in runs.items():
      assert r.selected == ref.selected, (name, r.selected, ref.selected)
      np.testing.assert_allclose(r.holdout_top1, ref.holdout_top1, atol=1e-9)
      np.testing.assert_allclose(r.test_scores, ref.test_scores, atol=2e-5)
      assert r.test_top1 == ref.test_top1 and r.test_top5 == ref.test_top5
    assert len(set(ref.holdout_top1)) > 2   # the grid's configs differ
    # each device holds its 1/8 block of the rows (38 = ceil(301 / 8))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    a = _data_layout.put_rows(x, 38, mesh)
    shards = a.addressable_shards
    assert len({s.device for s in shards}) == 8
    assert all(s.data.shape == (38, 16) for s in shards)
    np.testing.assert_array_equal(np.asarray(a)[:301], x)
    print("OK")
""")


def test_eight_devices_resident_and_streamed_equal_one_device():
  multiprocess_util.run_on_devices(_EIGHT_DEVICES, 8, timeout=400)


_TWO_PROCESSES = textwrap.dedent("""
    import sys, numpy as np, jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    from sslbench_jax.probes import linear
    rng = np.random.default_rng(12)
    centres = rng.normal(scale=1.5, size=(5, 12))
    y = rng.integers(0, 5, 203)
    x = (centres[y] + rng.normal(size=(203, 12))).astype(np.float32)
    configs = linear.grid(["a"], [0.05, 0.4], [1e-3], batchnorm=[False, True])
    tc = linear.TrainConfig(epochs=3, batch_size=37, warmup_epochs=1, seed=2)
    local = linear.train({"a": x}, y, 5, configs, tc, progress=False,
                         devices=jax.local_devices())
    streamed = linear.train({"a": x}, y, 5, configs, tc, progress=False,
                            device_budget_bytes=60 * 12 * 4)  # 2 steps a chunk
    for i in range(len(configs)):
      np.testing.assert_allclose(streamed.weights[i], local.weights[i], atol=1e-5)
      np.testing.assert_allclose(streamed.biases[i], local.biases[i], atol=1e-5)
    print("OK")
""")


def test_two_processes_streamed_equal_one_process():
  multiprocess_util.run_two_processes(_TWO_PROCESSES, timeout=400)
