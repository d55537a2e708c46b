"""Host input pipeline for extraction: parallel decode, then a device prefetch queue.

Examples are decoded a few steps ahead by ``num_workers`` workers; a
background thread stacks each step's rows, hands them to JAX (``to_device``)
and keeps ``depth`` ready batches in a queue, so host work overlaps the
accelerator's forward pass.

Two decode backends, with the same pixels in the same order:

* "threads": a thread pool in this process. PIL releases the GIL while it
  decodes and resizes, but the Python around it (opening the file, the
  source's ``get``, conversions) holds it, which caps a process at a few
  hundred images/s whatever the thread count.
* "processes": forked worker processes, one example at a time each, writing
  the pixels straight into a shared-memory ring of ``depth + 1`` steps (no
  pickling of pixels; only the label and id come back through a pipe). Fork
  is used so that the source and the preprocessing need not be picklable;
  the workers run only the host decode (PIL / NumPy), never JAX.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator
import concurrent.futures
import dataclasses
import multiprocessing
from multiprocessing import shared_memory
import queue
import threading
import time
from typing import Any
import warnings

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

DECODE_BACKENDS = ("threads", "processes")


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
                   num_threads: int, depth: int = 2,
                   decode_backend: str = "threads",
                   timer: "InputTimer | None" = None) -> Iterator[Batch]:
  """Yields ``Batch``es in step order with their images already on device.

  Args:
    steps: steps to produce, in order.
    positions_fn: step -> (rows,) dataset positions of this process (-1 = pad).
    load: position -> ``(pixels, label, id, keep)``; runs in the workers.
    pixel_shape: shape every ``pixels`` must have.
    pixel_dtype: dtype of the stacked batch.
    to_device: stacked ``(rows,) + pixel_shape`` array -> device value.
    num_threads: decode workers (threads or processes, see ``decode_backend``).
    depth: batches kept ready on device ahead of the consumer.
    decode_backend: "threads" or "processes" (module docstring).
    timer: when given, accumulates the time the consumer waited for batches.

  Yields:
    ``Batch`` with ``device`` set; padding and dropped rows are zeros.
  """
  if decode_backend not in DECODE_BACKENDS:
    raise ValueError(f"decode_backend must be one of {DECODE_BACKENDS}, got "
                     f"{decode_backend!r}")
  if num_threads < 1:
    raise ValueError(f"need at least 1 decode worker, got {num_threads}")
  stop = threading.Event()
  ready: queue.Queue = queue.Queue(maxsize=depth)
  steps = list(steps)
  pixel_shape = tuple(pixel_shape)
  ring = None
  if decode_backend == "processes" and steps:
    rows = max(len(positions_fn(s)) for s in steps)
    ring = _ProcessDecoder(load, num_threads, (depth + 1) * rows, pixel_shape,
                           pixel_dtype)

  def submit(pool, k, step):
    pos = positions_fn(step)
    if ring is None:
      return step, pos, [pool.submit(load, int(i)) if i >= 0 else None for i in pos]
    base = (k % (depth + 1)) * len(pos)   # this step's slots in the ring
    return step, pos, [ring.submit(int(i), base + row) if i >= 0 else None
                       for row, i in enumerate(pos)]

  def produce():
    pool = (concurrent.futures.ThreadPoolExecutor(num_threads, "feature-decode")
            if ring is None else None)
    try:
      pending = collections.deque()
      for k, step in enumerate(steps):
        pending.append(submit(pool, k, step))
        # Decode `depth` steps beyond the one being stacked: the pool never idles.
        # Its slots of the ring are reused only after `_emit` copied them.
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
      if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)

  def _emit(item) -> bool:
    step, pos, futures = item
    images = np.zeros((len(pos),) + pixel_shape, pixel_dtype)
    keep = np.zeros(len(pos), bool)
    labels, ids, skipped = [], [], []
    for row, fut in enumerate(futures):
      if fut is None:
        continue
      pixels, label, ex_id, ok = fut.result()
      if not ok:
        skipped.append(int(pos[row]))
        continue
      if ring is not None:
        pixels = ring.pixels(pixels)   # (slot, shape) -> the slot's view
      if pixels.shape != pixel_shape:
        raise ValueError(f"example {pos[row]} ({ex_id}) preprocesses to shape "
                         f"{pixels.shape}, expected {pixel_shape}: the "
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
      if timer is None:
        item = ready.get()
      else:
        with timer.waiting():
          item = ready.get()
      if item is None:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()
    if ring is not None:
      ring.close()


class InputTimer:
  """Wall time a consumer spent waiting for input vs everything else.

  ``start()`` when the loop begins; ``device_batches`` adds its waits;
  ``summary()`` at the end says whether the run was input-bound.
  """

  def __init__(self):
    self.wait_seconds = 0.0
    self._t0 = None
    self.total_seconds = 0.0

  def start(self) -> None:
    self._t0 = time.perf_counter()

  def stop(self) -> None:
    if self._t0 is not None:
      self.total_seconds = time.perf_counter() - self._t0

  @contextlib.contextmanager
  def waiting(self):
    t = time.perf_counter()
    try:
      yield
    finally:
      self.wait_seconds += time.perf_counter() - t

  def summary(self) -> dict[str, Any]:
    """{input_wait_seconds, compute_seconds, input_bound}: compute is the rest of
    the loop (forward pass, read-back, cache writes); input-bound when the
    consumer waited for batches longer than it computed."""
    compute = max(self.total_seconds - self.wait_seconds, 0.0)
    return dict(input_wait_seconds=round(self.wait_seconds, 3),
                compute_seconds=round(compute, 3),
                input_bound=bool(self.wait_seconds > compute))


class _ProcessDecoder:
  """Forked decode processes writing pixels into a shared-memory ring of slots."""

  def __init__(self, load, num_workers, slots, pixel_shape, pixel_dtype):
    self.shape, self.dtype = tuple(pixel_shape), np.dtype(pixel_dtype)
    self.slot_bytes = max(int(np.prod(self.shape)) * self.dtype.itemsize, 1)
    self.shm = shared_memory.SharedMemory(create=True, size=slots * self.slot_bytes)
    try:
      ctx = multiprocessing.get_context("fork")
    except ValueError as e:
      self.close()
      raise ValueError("decode_backend 'processes' needs the fork start method "
                       "(Linux); use 'threads'") from e
    # Forked children inherit `load` and the mapped ring: nothing is pickled.
    self.pool = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=ctx, initializer=_worker_init,
        initargs=(load, self.shm, self.shape, self.dtype, self.slot_bytes))
    with warnings.catch_warnings():
      # JAX warns on every fork; the workers never call into JAX.
      warnings.filterwarnings("ignore", message=".*os.fork.*")
      for f in [self.pool.submit(_worker_ready) for _ in range(num_workers)]:
        f.result()

  def submit(self, index: int, slot: int) -> concurrent.futures.Future:
    return self.pool.submit(_worker_load, index, slot)

  def pixels(self, where: tuple[int, tuple[int, ...]]) -> np.ndarray:
    slot, shape = where
    if shape != self.shape:   # not written; the caller reports the shape
      return np.empty(shape, np.uint8)
    return np.ndarray(self.shape, self.dtype, buffer=self.shm.buf,
                      offset=slot * self.slot_bytes)

  def close(self) -> None:
    pool = getattr(self, "pool", None)
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
    self.shm.close()
    self.shm.unlink()


_WORKER: dict[str, Any] = {}


def _worker_init(load, shm, shape, dtype, slot_bytes) -> None:
  _WORKER.update(load=load, shm=shm, shape=shape, dtype=dtype, slot_bytes=slot_bytes)


def _worker_ready() -> bool:
  return True


def _worker_load(index: int, slot: int):
  """Decodes ``index`` into ``slot``; returns ((slot, shape), label, id, keep)."""
  w = _WORKER
  pixels, label, ex_id, keep = w["load"](index)
  shape = tuple(np.shape(pixels))
  if keep and shape == w["shape"]:
    view = np.ndarray(w["shape"], w["dtype"], buffer=w["shm"].buf,
                      offset=slot * w["slot_bytes"])
    view[...] = pixels
  return (slot, shape), label, ex_id, keep
