"""Datasets cut out of another dataset's split: their features without the model.

A registry entry with ``derived_from`` (``registry.DatasetSpec``) reads a
subset of its parent's split, possibly relabelled: ImageNet ReaL
(``imagenet_real``) is ImageNet-1k validation without the 3,163 images whose
ReaL label set is empty, with multi-hot ReaL labels. Its feature set is the
parent's rows it keeps, in its order, with its labels and metadata: exactly
the file a direct extraction writes, without putting the images through the
model again.

  parent = derived.parent_split("imagenet_real", "validation")
  # -> ("imagenet1k", "validation")
  real_fs = derived.derive_features(val_fs, "imagenet_real", "validation",
                                    data_dir=data_dir, parent_file=val_path)

Feature sets are any dataclass with ``features``, ``labels``, ``ids`` and
``meta`` (``features.io.FeatureSet``); this module does not import the
features package (the data layer sits below it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, TypeVar

from absl import logging
import numpy as np

from sslbench_jax.data import dataset as dataset_lib
from sslbench_jax.data import registry

FS = TypeVar("FS")


def parent_split(name: str, split: str) -> tuple[str, str] | None:
  """The (dataset, split) that split ``split`` of ``name`` is cut out of.

  Args:
    name: a registry name.
    split: one of its splits (aliases allowed).

  Returns:
    ``(parent dataset, parent split)`` -- the parent's canonical split with
    the same backend split -- or None when ``name`` is not derived.

  Raises:
    ValueError: unknown dataset or split, or a parent without that split.
  """
  spec = registry.get_spec(name)
  if spec.derived_from is None:
    return None
  if split not in spec.splits:
    raise ValueError(f"Unknown split {split!r} for {name}; known: "
                     f"{', '.join(sorted(spec.splits))}")
  parent = registry.get_spec(spec.derived_from)
  backend = spec.splits[split]
  for s, b in parent.splits.items():  # the first name is the canonical one
    if b == backend:
      return parent.name, s
  raise ValueError(f"{name} split {split!r} is derived from {parent.name}, which "
                   f"has no {backend!r} split")


def is_parent_split(name: str, split: str, dataset: str, dataset_split: str) -> bool:
  """Whether ``dataset``/``dataset_split`` is the split ``name``/``split`` is cut from.

  Split aliases count as the same split (``val`` = ``validation``).
  """
  parent = parent_split(name, split)
  if parent is None or dataset != parent[0]:
    return False
  splits = registry.get_spec(dataset).splits
  return splits.get(dataset_split) == splits[parent[1]]


def derive_features(parent: FS, name: str, split: str, *, data_dir: str | None,
                    parent_file: str | None = None) -> FS | None:
  """The feature set of ``name``/``split`` cut out of its parent's feature set.

  Both datasets are opened from the registry with ``data_dir`` and the
  parent's preprocessing (no image is decoded) to check that the derived
  dataset reads exactly the parent's images, in the parent's order.

  Args:
    parent: the parent split's feature set (as extraction writes it: meta
      ``dataset``, ``split``, ``preprocessing``, ``num_skipped``).
    name: the derived dataset (``registry.get_spec(name).derived_from`` set).
    split: its split.
    data_dir: where both datasets are read from.
    parent_file: the parent's feature file (its base name is recorded).

  Returns:
    A feature set of the parent's type: the kept rows in the derived
    dataset's order, its labels (int8 multi-hot for a multi-label space, as
    extraction stores them), and the parent's meta with the derived
    dataset's ``dataset``, ``split``, ``source`` (label space included),
    ``num_examples``, ``num_skipped`` 0 and ``derived_from`` (file, dataset,
    split, cache_key of the parent; no ``cache_key`` or ``skipped_indices``
    of its own). None when it cannot be derived: the parent is another
    dataset or split, rows were skipped, the datasets cannot be opened, or
    they do not read the same images in the same order (another backend);
    the caller then extracts.

  Raises:
    ValueError: ``name`` is not a derived dataset.
  """
  want = parent_split(name, split)
  if want is None:
    raise ValueError(f"{name} is not derived from another dataset (registry "
                     "derived_from is None)")
  meta = parent.meta
  preset = meta.get("preprocessing")
  if (meta.get("num_skipped") or meta.get("dataset") != want[0] or not preset
      or not is_parent_split(name, split, want[0], str(meta.get("split")))):
    return None  # rows no longer line up with the parent's images one to one
  try:
    parent_ds = registry.open_dataset(want[0], meta["split"], data_dir=data_dir,
                                      preprocessing=preset)
    ds = registry.open_dataset(name, split, data_dir=data_dir, preprocessing=preset)
  except (ValueError, FileNotFoundError) as e:
    logging.info("%s not derived from %s: %s", name, parent_file or want[0], e)
    return None
  src = ds.source
  ids = np.asarray(parent.ids).astype(str)
  # Same backend (not TFDS for one, a folder for the other), same images in
  # the same order as the parent's rows.
  if (not isinstance(src, dataset_lib.SubsetSource)
      or type(src.source) is not type(parent_ds.source)
      or len(src.source) != len(parent.features)
      or not _source_ids(src.source) == _source_ids(parent_ds.source) == ids.tolist()):
    logging.info("%s does not read the images of %s: extracting it", name,
                 parent_file or want[0])
    return None
  keep = np.asarray(src.indices, np.int64)
  labels = np.asarray(parent.labels)[keep]
  if src.label_fn is not None:
    labels = [src.label_fn(int(k), parent.labels[k], str(ids[k])) for k in keep]
  if ds.label_space.multi_label:  # as Dataset.get hands them to extraction
    labels = np.stack([np.asarray(l, np.int8) for l in labels])
  else:
    labels = np.asarray([int(l) for l in labels], np.asarray(parent.labels).dtype)
  out_meta = dict(meta, dataset=name, split=split, source=ds.describe(),
                  num_examples=len(keep), num_skipped=0,
                  derived_from=dict(
                      file=None if parent_file is None else os.path.basename(parent_file),
                      dataset=meta["dataset"], split=meta["split"],
                      cache_key=meta.get("cache_key")))
  out_meta.pop("cache_key", None)  # no cache entry holds these rows
  out_meta.pop("skipped_indices", None)
  return dataclasses.replace(parent, features=np.asarray(parent.features)[keep],
                             labels=labels, ids=np.asarray(parent.ids)[keep],
                             meta=out_meta)


def _source_ids(src: Any) -> list[str]:
  if hasattr(src, "ids"):
    return list(src.ids())
  return [src.read(i)[2] for i in range(len(src))]
