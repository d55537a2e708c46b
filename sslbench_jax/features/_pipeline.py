"""Host input pipeline for extraction: threaded decode, then a device prefetch queue.

Decoding (PIL: JPEG decode, resize, crop) releases the GIL, so a thread pool
scales with cores without the start-up and pickling cost of worker processes.
Examples are decoded a few steps ahead; a background thread stacks each step's
rows, hands them to JAX (``to_device``) and keeps ``depth`` ready batches in a
queue, so host work overlaps the accelerator's forward pass.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
import concurrent.futures
import dataclasses
import queue
import threading
from typing import Any

import numpy as np
from PIL import Image


@dataclasses.dataclass
class Batch:
  """One process's rows of one step.

  Attributes:
    step: step index.
    positions: (rows,) dataset positions, -1 for padding.
    keep: (rows,) True for rows that are real, unmasked examples.
    labels: labels of the kept rows.
    ids: ids of the kept rows.
    skipped: positions of examples the source masked out.
    device: what ``to_device`` returned for the stacked images.
  """
  step: int
  positions: np.ndarray
  keep: np.ndarray
  labels: list[Any]
  ids: list[str]
  skipped: list[int]
  device: Any = None


Loaded = tuple[np.ndarray, Any, str, bool]  # pixels, label, id, keep


def example_loader(source: Any, pixels_fn: Callable[[Image.Image], np.ndarray] | None
                   ) -> Callable[[int], Loaded]:
  """Returns ``load(i) -> (pixels, label, id, keep)`` for a ``len``/``get(i)`` source.

  ``source.get(i)`` returns a dict with ``image`` and optionally ``label``,
  ``id`` and ``mask`` (False: drop the example, e.g. a skipped corrupt image).
  A float ``image`` is taken as already preprocessed; a PIL image or uint8
  array goes through ``pixels_fn`` (the host part of the preprocessing).
  """

  def load(i: int) -> Loaded:
    ex = source.get(int(i))
    img = ex["image"]
    if isinstance(img, np.ndarray) and np.issubdtype(img.dtype, np.floating):
      if pixels_fn is not None:
        raise ValueError(f"example {i}: the source already preprocesses images "
                         "(float image); do not pass a preprocessing as well")
      pixels = img
    else:
      if pixels_fn is None:
        raise ValueError(f"example {i}: the source yields raw images "
                         f"({type(img).__name__}); a preprocessing is required")
      if isinstance(img, np.ndarray):
        img = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img)
      elif not isinstance(img, Image.Image):
        raise ValueError(f"example {i}: image must be a PIL image or an array, "
                         f"got {type(img).__name__}")
      pixels = pixels_fn(img)
    label = ex.get("label")
    return (pixels, -1 if label is None else label, str(ex.get("id", i)),
            bool(ex.get("mask", True)))

  return load


def device_batches(steps: Iterable[int], positions_fn: Callable[[int], np.ndarray],
                   load: Callable[[int], Loaded], pixel_shape: tuple[int, ...],
                   pixel_dtype: np.dtype, to_device: Callable[[np.ndarray], Any],
                   num_threads: int, depth: int = 2) -> Iterator[Batch]:
  """Yields ``Batch``es in step order with their images already on device.

  Args:
    steps: steps to produce, in order.
    positions_fn: step -> (rows,) dataset positions of this process (-1 = pad).
    load: position -> ``(pixels, label, id, keep)``; runs in the thread pool.
    pixel_shape: shape every ``pixels`` must have.
    pixel_dtype: dtype of the stacked batch.
    to_device: stacked ``(rows,) + pixel_shape`` array -> device value.
    num_threads: decode threads.
    depth: batches kept ready on device ahead of the consumer.

  Yields:
    ``Batch`` with ``device`` set; padding and dropped rows are zeros.
  """
  stop = threading.Event()
  ready: queue.Queue = queue.Queue(maxsize=depth)
  steps = list(steps)

  def submit(pool, step):
    pos = positions_fn(step)
    return step, pos, [pool.submit(load, int(i)) if i >= 0 else None for i in pos]

  def produce():
    pool = concurrent.futures.ThreadPoolExecutor(num_threads, "feature-decode")
    try:
      pending = collections.deque()
      for step in steps:
        pending.append(submit(pool, step))
        # Decode `depth` steps beyond the one being stacked: the pool never idles.
        if len(pending) > depth and not _emit(pending.popleft()):
          return
      while pending:
        if not _emit(pending.popleft()):
          return
      _put(None)
    except BaseException as e:  # pylint: disable=broad-except
      _put(e)
    finally:
      # The consumer stopped early (or failed): drop decodes not yet started.
      pool.shutdown(wait=True, cancel_futures=True)

  def _emit(item) -> bool:
    step, pos, futures = item
    images = np.zeros((len(pos),) + tuple(pixel_shape), pixel_dtype)
    keep = np.zeros(len(pos), bool)
    labels, ids, skipped = [], [], []
    for row, fut in enumerate(futures):
      if fut is None:
        continue
      pixels, label, ex_id, ok = fut.result()
      if not ok:
        skipped.append(int(pos[row]))
        continue
      if pixels.shape != tuple(pixel_shape):
        raise ValueError(f"example {pos[row]} ({ex_id}) preprocesses to shape "
                         f"{pixels.shape}, expected {tuple(pixel_shape)}: the "
                         "preprocessing must produce fixed-size images")
      images[row] = pixels
      keep[row] = True
      labels.append(label)
      ids.append(ex_id)
    return _put(Batch(step, pos, keep, labels, ids, skipped, to_device(images)))

  def _put(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  thread = threading.Thread(target=produce, name="feature-input", daemon=True)
  thread.start()
  try:
    while True:
      item = ready.get()
      if item is None:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()
