"""Image files on disk: class sub-folders (torchvision ``ImageFolder``) or a CSV.

* ``FolderSource(root)``: ``root/<class>/<file>``; classes are the sorted
  sub-folder names (index = position), files sorted within a class, as
  ``ImageFolder`` does. ``classes=`` fixes the class list (e.g. the 1000 sorted
  wnids, so an ImageNet-R folder of 200 wnids keeps 1000-space labels), and
  ``class_to_index=`` maps folder names to labels directly (ImageNet-v2's
  folders are named "0".."999").
* ``CsvSource(csv_path)``: rows ``path,label`` (optional header); relative paths
  are resolved against the CSV's folder (or ``root``). Integer labels are used
  as given; otherwise label names are mapped to their sorted position.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Sequence

# The file endings torchvision's ImageFolder accepts (its ``IMG_EXTENSIONS``),
# matched case-insensitively; the one list for every image folder we read.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                    ".webp")


def is_image_file(name: str) -> bool:
  """True if ``name`` ends (any case) with one of ``IMAGE_EXTENSIONS``."""
  return name.lower().endswith(IMAGE_EXTENSIONS)


class FolderSource:
  """``root/<class>/<image>`` with ImageFolder ordering."""

  def __init__(self, root: str, classes: Sequence[str] | None = None,
               class_to_index: dict[str, int] | None = None,
               allow_missing_classes: bool = True):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"Image folder not found: {root}")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not found:
      raise FileNotFoundError(f"No class sub-folders in {root} (expected root/<class>/<image>)")
    if class_to_index is None:
      classes = list(classes) if classes is not None else found
      class_to_index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in class_to_index]
    if unknown:
      raise ValueError(f"{root}: folder(s) {unknown[:5]} are not known classes "
                       f"({len(unknown)} unknown)")
    if not allow_missing_classes and len(found) != len(class_to_index):
      raise ValueError(f"{root}: {len(found)} class folders, expected {len(class_to_index)}")
    self.root = root
    self.classes = tuple(sorted(class_to_index, key=class_to_index.get))
    self.samples: list[tuple[str, int]] = []
    for c in sorted(found, key=lambda c: (class_to_index[c], c)):
      folder = os.path.join(root, c)
      # ImageFolder's order: walk results sorted by directory path string.
      for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
        for f in sorted(files):
          if is_image_file(f):
            self.samples.append((os.path.join(dirpath, f), class_to_index[c]))
    if not self.samples:
      raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")

  def __len__(self) -> int:
    return len(self.samples)

  def read(self, index: int) -> tuple[Any, Any, str]:
    path, label = self.samples[index]
    return path, label, os.path.relpath(path, self.root)


class CsvSource:
  """Images listed in a CSV of ``path,label``."""

  def __init__(self, csv_path: str, root: str | None = None):
    if not os.path.isfile(csv_path):
      raise FileNotFoundError(f"CSV file not found: {csv_path}")
    root = root or os.path.dirname(os.path.abspath(csv_path))
    rows = []
    with open(csv_path, newline="") as f:
      for lineno, row in enumerate(csv.reader(f), 1):
        if not row or row[0].startswith("#"):
          continue
        if len(row) < 2:
          raise ValueError(f"{csv_path}:{lineno}: expected 'path,label', got {row}")
        if lineno == 1 and row[0].strip().lower() == "path":
          continue   # header
        rows.append((row[0].strip(), row[1].strip()))
    if not rows:
      raise ValueError(f"{csv_path}: no rows")
    labels = [r[1] for r in rows]
    if all(_is_int(v) for v in labels):
      ints = [int(v) for v in labels]
      self.classes = tuple(str(i) for i in range(max(ints) + 1))
    else:
      self.classes = tuple(sorted(set(labels)))
      index = {c: i for i, c in enumerate(self.classes)}
      ints = [index[v] for v in labels]
    self.root = root
    self.samples = [(p if os.path.isabs(p) else os.path.join(root, p), y, p)
                    for (p, _), y in zip(rows, ints)]

  def __len__(self) -> int:
    return len(self.samples)

  def read(self, index: int) -> tuple[Any, Any, str]:
    path, label, name = self.samples[index]
    return path, label, name


def _is_int(v: str) -> bool:
  try:
    int(v)
    return True
  except ValueError:
    return False


class ListSource:
  """An explicit list of ``(path, label, id)``."""

  def __init__(self, samples: Sequence[tuple[str, Any, str]]):
    self.samples = list(samples)

  def __len__(self) -> int:
    return len(self.samples)

  def read(self, index: int) -> tuple[Any, Any, str]:
    return self.samples[index]
