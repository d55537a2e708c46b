"""The uniform random-access dataset every consumer sees.

A ``Source`` knows where examples live (TFDS ArrayRecord, image folder, CSV,
IDX files, ...); ``read(i)`` returns ``(image_like, label, id)`` without
decoding. ``Dataset`` adds decoding, preprocessing and corrupt-image policy::

  ds = open_dataset("cifar100", "test")     # see registry.py
  len(ds); ds.label_space.num_classes
  ex = ds.get(0)   # {"image": float32 (H, W, 3), "label": int or int8 multi-hot,
                   #  "id": str, "index": int, "mask": bool}

``mask`` is False only for a corrupt image skipped under ``on_corrupt="skip"``
(the image is then zeros); batches use the same flag for padding, so skipped
examples drop out of features exactly like padding does.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Protocol, Union

import numpy as np
from absl import logging
from PIL import Image

from sslbench_jax.data import augment as augment_lib
from sslbench_jax.data import images
from sslbench_jax.data import label_spaces
from sslbench_jax.data import preprocess as preprocess_lib

Preprocessing = Union[str, Callable[[Image.Image], np.ndarray], augment_lib.TrainAugment, None]
_ON_CORRUPT = ("error", "skip")


class Source(Protocol):
  """Where the examples of one split live."""

  def __len__(self) -> int:
    ...

  def read(self, index: int) -> tuple[Any, Any, str]:
    """Returns ``(image_like, label, id)``; see ``images.to_pil``."""
    ...


class Dataset:
  """Random-access examples with labels, preprocessing and provenance.

  Attributes:
    name: registry name.
    split: split name.
    label_space: the ``LabelSpace``.
    preprocessing_name: preset name (or "custom") for provenance.
  """

  def __init__(self, source: Source, label_space: label_spaces.LabelSpace, *,
               name: str, split: str, preprocessing: Preprocessing = None,
               default_preprocessing: str = "imagenet_bilinear",
               on_corrupt: str = "error", seed: int = 0):
    """Wraps ``source``.

    Args:
      source: a ``Source``.
      label_space: its label space.
      name: dataset name.
      split: split name.
      preprocessing: preset name, callable ``PIL -> float32``, a
        ``TrainAugment`` (seeded per example), or None for the default.
      default_preprocessing: preset used when ``preprocessing`` is None.
      on_corrupt: "error" (raise, naming the file) or "skip" (warn, zero
        image, ``mask=False``, counted in ``corrupt_report()``).
      seed: global augmentation seed (only used with a ``TrainAugment``).
    """
    if on_corrupt not in _ON_CORRUPT:
      raise ValueError(f"on_corrupt must be one of {_ON_CORRUPT}, got {on_corrupt!r}")
    self.source = source
    self.label_space = label_space
    self.name = name
    self.split = split
    self.on_corrupt = on_corrupt
    self.seed = seed
    if preprocessing is None:
      preprocessing = default_preprocessing
    if isinstance(preprocessing, str):
      self.preprocessing_name = preprocessing
      preprocessing = preprocess_lib.get_preset(preprocessing)
    else:
      self.preprocessing_name = getattr(preprocessing, "name", "custom")
    self.preprocessing = preprocessing
    self._corrupt: list[tuple[int, str, str]] = []
    self._lock = threading.Lock()
    self._blank: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.source)

  def __getstate__(self):
    # Picklable for worker processes (the lock is per process; skips counted
    # in a worker stay there, but show up as mask=False in its examples).
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return (f"Dataset({self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={self.label_space.num_classes}, preprocessing={self.preprocessing_name!r})")

  def _transform(self, img: Image.Image, index: int, epoch: int) -> np.ndarray:
    if isinstance(self.preprocessing, augment_lib.TrainAugment):
      return self.preprocessing(img, seed=self.seed, epoch=epoch, index=index)
    return self.preprocessing(img)

  def _label(self, label: Any) -> Any:
    if self.label_space.multi_label:
      return np.asarray(label, np.int8)
    return int(label)

  def get(self, index: int, epoch: int = 0) -> dict[str, Any]:
    """One preprocessed example.

    Args:
      index: in ``[0, len(self))``.
      epoch: only affects a ``TrainAugment`` preprocessing.

    Returns:
      dict with ``image`` float32 (H, W, 3), ``label`` (int, or int8 multi-hot),
      ``id`` str, ``index`` int, ``mask`` bool.
    """
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{self.name}/{self.split}: index {index} out of range "
                       f"[0, {len(self)})")
    image_like, label, example_id = self.source.read(index)
    try:
      img = images.to_pil(image_like, example_id)
      x = self._transform(img, index, epoch)
      mask = True
    except images.CorruptImageError as e:
      if self.on_corrupt == "error":
        raise
      logging.warning("Skipping corrupt image (%s/%s #%d): %s", self.name,
                      self.split, index, e)
      with self._lock:
        self._corrupt.append((index, example_id, str(e)))
      x, mask = self.blank(), False
    return {"image": np.asarray(x, np.float32), "label": self._label(label),
            "id": example_id, "index": index, "mask": mask}

  def blank(self) -> np.ndarray:
    """A zero image with the preprocessing's output shape (padding / skips)."""
    if self._blank is None:
      self._blank = np.zeros_like(self._transform(Image.new("RGB", (8, 8)), 0, 0),
                                  dtype=np.float32)
    return self._blank

  def corrupt_report(self) -> dict[str, Any]:
    """Corrupt images skipped so far: count and (index, id, error) entries."""
    with self._lock:
      entries = sorted(self._corrupt)
    return {"dataset": self.name, "split": self.split, "num_corrupt": len(entries),
            "examples": [{"index": i, "id": n, "error": m} for i, n, m in entries]}

  def describe(self) -> dict[str, Any]:
    """Provenance for feature files and results."""
    d = {"dataset": self.name, "split": self.split, "num_examples": len(self),
         "label_space": self.label_space.to_json(),
         "preprocessing": self.preprocessing_name}
    p = self.preprocessing
    if isinstance(p, preprocess_lib.Preprocess):
      d["preprocessing_detail"] = {**dataclasses.asdict(p.config),
                                   "torchvision": preprocess_lib.torchvision_string(p.config)}
    elif isinstance(p, augment_lib.TrainAugment):
      d["preprocessing_detail"] = {**dataclasses.asdict(p.config), "seed": self.seed}
    return d


class SubsetSource:
  """Examples ``indices`` of another source, with an optional label override."""

  def __init__(self, source: Any, indices: list[int],
               label_fn: Callable[[int, Any, str], Any] | None = None):
    self.source = source
    self.indices = list(indices)
    self.label_fn = label_fn

  def __len__(self) -> int:
    return len(self.indices)

  def read(self, index: int) -> tuple[Any, Any, str]:
    image, label, example_id = self.source.read(self.indices[index])
    if self.label_fn is not None:
      label = self.label_fn(self.indices[index], label, example_id)
    return image, label, example_id
