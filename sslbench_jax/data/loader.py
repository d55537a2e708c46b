"""Batches of one host's shard, decoded and preprocessed in parallel with grain.

``iterate_batches(ds, plan)`` yields, for each step of a ``sharding.ShardPlan``,
a dict of NumPy arrays::

  image (b, H, W, 3) float32   label (b,) int64 or (b, C) int8 multi-hot
  id (b,) str                  index (b,) int64 (-1 = padding)
  mask (b,) bool               (False = padding or a skipped corrupt image)

Decoding runs on ``num_threads`` threads (PIL releases the GIL while decoding
and resizing), optionally in ``num_workers`` processes on top. Batch contents
and order depend only on the plan, never on the thread/worker count.

Example:
  >>> plan = sharding.shard_plan(len(ds), global_batch=256)
  >>> for batch in iterate_batches(ds, plan):
  ...   feats = predict(batch["image"])   # keep rows where batch["mask"]
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
from absl import flags
import numpy as np

from sslbench_jax.data import dataset as dataset_lib
from sslbench_jax.data import sharding


class _Load:
  """Index -> example (picklable, for worker processes)."""

  def __init__(self, ds: dataset_lib.Dataset, epoch: int):
    self.ds = ds
    self.epoch = epoch

  def __call__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      return {"image": self.ds.blank(), "label": self.ds.blank_label(), "id": "",
              "index": -1, "mask": False}
    return self.ds.get(index, epoch=self.epoch)


def collate(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks examples into a batch dict (see module docstring)."""
  return {
      "image": np.stack([e["image"] for e in examples]).astype(np.float32),
      "label": np.stack([np.asarray(e["label"]) for e in examples]).astype(
          np.int8 if np.ndim(examples[0]["label"]) else np.int64),
      "id": np.asarray([e["id"] for e in examples], dtype=str),
      "index": np.asarray([e["index"] for e in examples], np.int64),
      "mask": np.asarray([e["mask"] for e in examples], bool),
  }


def iterate_batches(ds: dataset_lib.Dataset, plan: sharding.ShardPlan, *,
                    epoch: int = 0, num_threads: int = 8, num_workers: int = 0,
                    prefetch: int = 64) -> Iterator[dict[str, np.ndarray]]:
  """Yields the ``plan.steps`` batches of this host.

  Args:
    ds: the dataset (its ``len`` must equal ``plan.num_examples``).
    plan: this host's ``ShardPlan``.
    epoch: passed to a ``TrainAugment`` preprocessing.
    num_threads: decoding threads (per worker process).
    num_workers: extra worker processes (0 = threads in this process).
    prefetch: examples buffered ahead.

  Yields:
    Batch dicts of ``plan.local_batch`` examples.
  """
  if len(ds) != plan.num_examples:
    raise ValueError(f"plan is for {plan.num_examples} examples, dataset has {len(ds)}")
  if plan.steps == 0:
    return
  flat = plan.indices.reshape(-1).tolist()
  read = grain.ReadOptions(num_threads=max(1, num_threads),
                           prefetch_buffer_size=max(1, prefetch))
  source = grain.MapDataset.source(flat).map(_Load(ds, epoch))
  if num_workers == 0:
    # Threads decode single examples; batching after keeps the plan's order.
    it = source.to_iter_dataset(read).batch(plan.local_batch, batch_fn=collate)
  else:
    # Workers get whole batches round-robin (grain re-interleaves in order),
    # so batch contents stay those of the plan.
    # grain's worker processes read absl flags; outside absl.app (tests,
    # notebooks) they are unparsed, so use their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = (source.batch(plan.local_batch, batch_fn=collate).to_iter_dataset(read)
          .mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers)))
  yield from it


def batches(ds: dataset_lib.Dataset, global_batch: int, *, num_shards: int | None = None,
            shard_index: int | None = None, mode: str = "contiguous",
            **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
  """``iterate_batches`` over this host's ``shard_plan`` (see sharding.py)."""
  plan = sharding.shard_plan(len(ds), global_batch, num_shards, shard_index, mode)
  return iterate_batches(ds, plan, **kwargs)
