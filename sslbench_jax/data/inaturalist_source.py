"""iNaturalist 2021 at a taxonomy level (the study uses "family": 1,103 classes).

Layout (torchvision ``INaturalist``; the official ``train_mini.tar.gz`` and
``val.tar.gz`` from github.com/visipedia/inat_comp/tree/master/2021 extracted)::

  <data_dir>/2021_train_mini/00000_Animalia_Annelida_Clitellata_..._terrestris/*.jpg
  <data_dir>/2021_valid/...

(the tars extract to ``train_mini/`` and ``val/``; those names are accepted too).
Each folder name is ``<5-digit id>_kingdom_phylum_class_order_family_genus_species``.
As in torchvision, a level's class index is the order of first appearance of
its names when walking the sorted species folders.
"""

from __future__ import annotations

import os
from typing import Any

from sslbench_jax.data import folder_source

LEVELS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
_SPLIT_DIRS = {"train_mini": ("2021_train_mini", "train_mini"),
               "train": ("2021_train", "train"),
               "val": ("2021_valid", "val")}


class INaturalist2021Source:
  """One split of iNat 2021 labelled at ``level``."""

  def __init__(self, data_dir: str, split: str, level: str = "family"):
    if level not in LEVELS:
      raise ValueError(f"Unknown taxonomy level {level!r}; known: {', '.join(LEVELS)}")
    if split not in _SPLIT_DIRS:
      raise ValueError(f"Unknown iNaturalist 2021 split {split!r}; known: {', '.join(_SPLIT_DIRS)}")
    root = next((os.path.join(data_dir, d) for d in _SPLIT_DIRS[split]
                 if os.path.isdir(os.path.join(data_dir, d))), None)
    if root is None:
      raise FileNotFoundError(
          f"iNaturalist 2021 split {split!r} not found under {data_dir} (expected "
          f"{' or '.join(_SPLIT_DIRS[split])}/): download {split}.tar.gz from "
          "https://github.com/visipedia/inat_comp/tree/master/2021 and extract it there")
    species = sorted(e.name for e in os.scandir(root) if e.is_dir())
    names: dict[str, int] = {}
    folder_to_label = {}
    for expected_id, folder in enumerate(species):
      parts = folder.split("_")
      if len(parts) != 8 or parts[0] != f"{expected_id:05d}":
        raise ValueError(f"{root}/{folder}: not an iNaturalist 2021 species folder "
                         f"(expected '{expected_id:05d}_kingdom_..._species')")
      name = parts[1 + LEVELS.index(level)] if level != "species" else "_".join(parts[6:])
      folder_to_label[folder] = names.setdefault(name, len(names))
    self.level = level
    self.classes = tuple(sorted(names, key=names.get))
    self._folder = folder_source.FolderSource(root, class_to_index=folder_to_label)

  def __len__(self) -> int:
    return len(self._folder)

  def read(self, index: int) -> tuple[Any, Any, str]:
    return self._folder.read(index)
