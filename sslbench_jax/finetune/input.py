"""Host-side input: augmented uint8 training batches and padded eval batches.

The data order is a pure function of ``(seed, epoch, step)``: epoch ``e``
visits the training examples in ``default_rng([seed, e]).permutation(n)``
order, step ``s`` of that epoch takes positions ``[s B, (s + 1) B)`` (the
last incomplete batch is dropped, as a fixed global batch needs), and the
augmentation of example ``i`` in epoch ``e`` is
``augment.example_rng(seed, e, i)``'s (torchvision-exact RandomResizedCrop +
flip, ``sslbench_jax/data/augment.py``). A resumed run therefore sees exactly
the batches an uninterrupted one sees, whatever the threads or processes.

Each process decodes and augments only its own rows of the global batch
(process ``p`` of ``P``: rows ``[p B / P, (p + 1) B / P)``) on a thread pool,
a few batches ahead of the training step (``prefetch``); pixels stay uint8
and are normalised on the device.

Eval batches follow the project's exact pad + mask pattern: the last batch is
filled with zero images whose mask is False, so every test example counts
exactly once whatever the batch or device count.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Callable, Iterator

import numpy as np

from sslbench_jax import parallel
from sslbench_jax.data import augment as augment_lib
from sslbench_jax.data import images as images_lib


def read_labels(ds: Any) -> np.ndarray:
  """All integer labels of a dataset (no image decoding)."""
  if ds.label_space.multi_label:
    raise ValueError(f"dataset {ds.name}: multi-label datasets cannot be trained "
                     "with the single-label fine-tuning protocols")
  return np.asarray([int(ds.source.read(i)[1]) for i in range(len(ds))], np.int64)


def _pixels(ds: Any, example: int, fn: Callable[..., np.ndarray], **kw) -> np.ndarray:
  image_like, _, example_id = ds.source.read(int(example))
  return fn(images_lib.to_pil(image_like, example_id), **kw)


class TrainInput:
  """Augmented training batches of ``indices`` of ``ds``.

  Attributes:
    steps_per_epoch: full global batches per epoch.
  """

  def __init__(self, ds: Any, indices: np.ndarray, labels: np.ndarray,
               augment: augment_lib.TrainAugment, global_batch: int, seed: int,
               threads: int = 4, prefetch: int = 2):
    self.ds, self.indices, self.labels = ds, np.asarray(indices), np.asarray(labels)
    self.augment, self.batch, self.seed = augment, int(global_batch), int(seed)
    self.steps_per_epoch = len(self.indices) // self.batch
    if self.steps_per_epoch < 1:
      raise ValueError(f"{len(self.indices)} training examples are fewer than one "
                       f"global batch of {self.batch}")
    self.prefetch = max(1, prefetch)
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, threads))
    self._rows = parallel.process_rows(self.batch)

  def batch_indices(self, step: int) -> tuple[int, np.ndarray]:
    """(epoch, dataset indices of the global batch) of global ``step``."""
    epoch, s = divmod(int(step), self.steps_per_epoch)
    perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
    return epoch, self.indices[perm[s * self.batch:(s + 1) * self.batch]]

  def load(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of ``step``: uint8 (b, S, S, 3) pixels and labels."""
    epoch, idx = self.batch_indices(step)
    idx = idx[self._rows]
    pixels = list(self._pool.map(
        lambda i: _pixels(self.ds, i, self.augment.geometry, seed=self.seed,
                          epoch=epoch, index=int(i)), idx))
    return np.stack(pixels), self.labels[idx].astype(np.int32)

  def iterate(self, start: int, stop: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(step, pixels, labels)`` for steps ``[start, stop)``, prefetched."""
    ahead: collections.deque = collections.deque()
    loader = concurrent.futures.ThreadPoolExecutor(1)
    nxt = start
    try:
      while nxt < stop or ahead:
        while nxt < stop and len(ahead) < self.prefetch:
          ahead.append((nxt, loader.submit(self.load, nxt)))
          nxt += 1
        step, fut = ahead.popleft()
        x, y = fut.result()
        yield step, x, y
    finally:
      for _, fut in ahead:
        fut.cancel()
      loader.shutdown(wait=True, cancel_futures=True)

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)


def eval_batches(ds: Any, labels: np.ndarray, geometry: Callable[[Any], np.ndarray],
                 global_batch: int, threads: int = 4
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """This process's rows of padded eval batches: (uint8 pixels, labels, mask)."""
  n = len(ds)
  rows = parallel.process_rows(global_batch)
  blank = None
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    for start in range(0, n, global_batch):
      idx = np.arange(start, start + global_batch)[rows]
      real = idx[idx < n]
      pix = list(pool.map(lambda i: _pixels(ds, i, geometry), real))
      if blank is None:
        blank = np.zeros_like(pix[0]) if pix else None
      if blank is None:  # this process has only padding rows in the first batch
        blank = np.zeros_like(_pixels(ds, 0, geometry))
      pad = len(idx) - len(real)
      x = np.stack(pix + [blank] * pad)
      y = np.concatenate([labels[real], np.zeros(pad, np.int64)]).astype(np.int32)
      mask = np.arange(len(idx)) < len(real)
      yield x, y, mask
