"""TFDS datasets read with ``tfds.data_source`` (ArrayRecord; no TensorFlow).

Images are read as the stored encoded bytes (``SkipDecoding``) and decoded by
PIL in ``images.to_pil``, exactly as torchvision's loader decodes a JPEG file.
(Under ``tfds.testing.mock_data`` the image arrives decoded; both work.)

Preparing a dataset needs TensorFlow once, on any machine::

  pip install "sslbench_jax[tf]"
  tfds build imagenet2012 --data_dir=$TFDS_DATA_DIR --manual_dir=/path/to/tars \
      --file_format=array_record

Already prepared as TFRecord? ``tfds convert_format --dataset_dir=... \
--out_file_format=array_record`` converts it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np
from absl import logging

from sslbench_jax import atomic

LabelFn = Callable[[dict[str, Any]], Any]


def _text(v: Any) -> str:
  if isinstance(v, (bytes, np.bytes_)):
    return v.decode("utf-8")
  if isinstance(v, np.ndarray):
    return _text(v.item())
  return str(v)


def _default_data_dir(data_dir: str | None) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


class TfdsSource:
  """One split of a TFDS dataset, random access.

  Args:
    name: TFDS name with config, e.g. "imagenet_v2/matched-frequency".
    split: TFDS split name (slicing like "train[:10%]" allowed).
    data_dir: TFDS data dir (default ``$TFDS_DATA_DIR`` or ~/tensorflow_datasets).
    label_fn: example dict -> label; default ``int(example["label"])``.
    id_key: feature holding a file name / id; None uses "<split>/<index>".
    image_key: the image feature.
    prepare_hint: extra text for the "not prepared" error (manual downloads).
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None, *,
               label_fn: LabelFn | None = None, id_key: str | None = None,
               image_key: str = "image", prepare_hint: str = ""):
    self.name = name
    self.split = split
    self.data_dir = _default_data_dir(data_dir)
    self.image_key = image_key
    self.id_key = id_key
    self.label_fn = label_fn or (lambda ex: int(ex["label"]))
    self._prepare_hint = prepare_hint
    self._ds = self._open()
    self._ids: list[str] | None = None

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      ds = tfds.data_source(
          self.name, split=self.split, data_dir=self.data_dir, download=False,
          decoders={self.image_key: tfds.decode.SkipDecoding()})
      try:
        if len(ds):
          ds[0]   # pylint: disable=pointless-statement
      except (ModuleNotFoundError, ValueError) as e:
        # tfds.testing.mock_data encodes fake examples (with TensorFlow) when
        # decoders are set; use decoded arrays (images.to_pil takes both).
        logging.warning("%s: reading raw image bytes failed (%s); using TFDS-decoded "
                        "images", self.name, str(e).splitlines()[0][:120])
        ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                              download=False)
      return ds
    except (NotImplementedError, ValueError, FileNotFoundError, AssertionError,
            KeyError, tfds.core.registered.DatasetNotFoundError) as e:
      raise FileNotFoundError(self._not_prepared_message(e)) from None

  def _not_prepared_message(self, e: Exception) -> str:
    base = self.name.split("/")[0]
    hint = f" {self._prepare_hint}" if self._prepare_hint else ""
    if "TFRECORD" in str(e).upper():
      if "already prepared" in str(e) and os.path.isdir(
          os.path.join(self.data_dir, *self.name.split("/"))):
        return (f"TFDS dataset {self.name!r} in {self.data_dir} is prepared as "
                f"TFRecord; convert it: tfds convert_format --dataset_dir="
                f"{os.path.join(self.data_dir, *self.name.split('/'))}/<version> "
                f"--out_file_format=array_record")
    return (f"TFDS dataset {self.name!r} split {self.split!r} is not prepared in "
            f"{self.data_dir} (as array_record).{hint} Prepare it once (needs "
            f"tensorflow): tfds build {base} "
            f"{'--config=' + self.name.split('/')[1] + ' ' if '/' in self.name else ''}"
            f"--data_dir={self.data_dir} --file_format=array_record "
            f"(see docs/datasets.md). Underlying error: {str(e).splitlines()[0][:200]}")

  def __len__(self) -> int:
    return len(self._ds)

  def class_names(self, key: str = "label") -> tuple[str, ...] | None:
    """Names of a ClassLabel feature as stored with the prepared data."""
    info = getattr(self._ds, "dataset_info", None)
    try:
      return tuple(info.features[key].names)
    except (AttributeError, KeyError, TypeError):
      return None

  def example(self, index: int) -> dict[str, Any]:
    """The raw TFDS example (image left encoded)."""
    return self._ds[int(index)]

  def example_id(self, index: int, ex: dict[str, Any] | None = None) -> str:
    if self.id_key is None:
      return f"{self.split}/{index}"
    ex = self.example(index) if ex is None else ex
    return _text(ex[self.id_key])

  def read(self, index: int) -> tuple[Any, Any, str]:
    ex = self.example(index)
    return ex[self.image_key], self.label_fn(ex), self.example_id(index, ex)

  def ids(self, cache_dir: str | None = None) -> list[str]:
    """All example ids, in order; cached on disk (a full pass reads images too)."""
    if self._ids is not None:
      return self._ids
    if self.id_key is None:
      self._ids = [f"{self.split}/{i}" for i in range(len(self))]
      return self._ids
    cache_dir = cache_dir or os.path.join(self.data_dir, "sslbench_cache")
    version = str(getattr(getattr(self._ds, "dataset_info", None), "version", "unknown"))
    fname = f"{self.name.replace('/', '__')}-{version}-{self.split}-{len(self)}-ids.json"
    path = os.path.join(cache_dir, fname)
    if os.path.exists(path):
      with open(path) as f:
        self._ids = json.load(f)
      return self._ids
    logging.info("Indexing %s %s ids (one pass, cached at %s)", self.name, self.split, path)
    ids = []
    getitems = getattr(self._ds, "__getitems__", None)
    for start in range(0, len(self), 512):
      keys = list(range(start, min(len(self), start + 512)))
      exs = getitems(keys) if getitems else [self.example(i) for i in keys]
      ids.extend(self.example_id(i, ex) for i, ex in zip(keys, exs))
    self._ids = ids
    try:
      atomic.write_text(path, json.dumps(self._ids))
    except OSError as e:  # read-only data dir: keep the in-memory index
      logging.warning("Could not cache ids at %s: %s", path, e)
    return self._ids

