"""Exact sharded input: no duplicates, no drops, equal steps on every host."""

import collections

import numpy as np
import pytest

from sslbench_jax.data import sharding


@pytest.mark.parametrize("mode", ["contiguous", "strided"])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 24, 97, 1000, 1001])
@pytest.mark.parametrize("per_host_batch", [1, 3, 16])
def test_multiset_equals_dataset(mode, num_shards, n, per_host_batch):
  global_batch = per_host_batch * num_shards
  plans = [sharding.shard_plan(n, global_batch, num_shards, p, mode)
           for p in range(num_shards)]
  counts = collections.Counter()
  for plan in plans:
    assert plan.indices.shape == plan.mask.shape
    assert plan.local_batch == per_host_batch
    assert ((plan.indices >= 0) == plan.mask).all()
    counts.update(plan.indices[plan.mask].tolist())
  assert counts == collections.Counter(range(n))   # each index exactly once
  steps = {plan.steps for plan in plans}
  assert len(steps) == 1
  # Independent count: the largest shard has ceil(n / P) examples.
  expected_steps = 0 if n == 0 else max(1, int(np.ceil(np.ceil(n / num_shards) / per_host_batch)))
  assert steps == {expected_steps}
  # Padding only at the end of each shard.
  for plan in plans:
    flat = plan.mask.reshape(-1)
    assert not np.any(~flat[:-1] & flat[1:])


def test_contiguous_and_strided_layouts():
  c = [sharding.shard_indices(10, 3, p, "contiguous").tolist() for p in range(3)]
  assert c == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  s = [sharding.shard_indices(10, 3, p, "strided").tolist() for p in range(3)]
  assert s == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
  plan = sharding.shard_plan(10, 4, 2, 1)
  np.testing.assert_array_equal(plan.indices, [[5, 6], [7, 8], [9, -1]])


def test_bad_arguments():
  with pytest.raises(ValueError, match="multiple"):
    sharding.shard_plan(10, 5, 2, 0)
  with pytest.raises(ValueError, match="shard_index"):
    sharding.shard_plan(10, 4, 2, 2)
  with pytest.raises(ValueError, match="strided"):
    sharding.shard_plan(10, 4, 2, 0, mode="random")


def test_defaults_from_jax_single_process():
  plan = sharding.shard_plan(5, 4)
  assert plan.num_shards == 1 and plan.shard_index == 0
  np.testing.assert_array_equal(plan.indices, [[0, 1, 2, 3], [4, -1, -1, -1]])


@pytest.mark.parametrize("mode", ["contiguous", "strided"])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
def test_shards_read_dataset_exactly(mode, num_shards):
  from sslbench_jax.data import registry
  ds = registry.open_dataset("digits", "test", preprocessing="no_norm")
  per_host = 7
  ids, steps = collections.Counter(), set()
  for p in range(num_shards):
    plan = sharding.shard_plan(len(ds), per_host * num_shards, num_shards, p, mode)
    steps.add(plan.steps)
    assert plan.indices.shape == (plan.steps, per_host)
    ids.update(ds.source.read(int(i))[2] for i in plan.indices.reshape(-1) if i >= 0)
  assert len(steps) == 1
  assert ids == collections.Counter(ds.source.read(i)[2] for i in range(len(ds)))
  assert len(ids) == len(ds)
