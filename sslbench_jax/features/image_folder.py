"""A folder of images as an indexable source (``len`` + ``get(i)``), for ``features --images``.

Files are listed recursively and sorted by relative path, so the order (and
the ids, the relative paths) does not depend on the file system. Labels are
unknown (-1).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from sslbench_jax.data import folder_source
from sslbench_jax.data import images


class ImageFolder:
  """Every image file under ``directory``.

  Attributes:
    directory: the absolute root.
    files: sorted relative paths.
  """

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"image folder {directory} does not exist")
    self.directory = os.path.abspath(directory)
    files = []
    for root, dirs, names in os.walk(self.directory):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      for name in names:
        if folder_source.is_image_file(name) and not name.startswith("."):
          files.append(os.path.relpath(os.path.join(root, name), self.directory))
    if not files:
      raise ValueError(f"no images ({', '.join(folder_source.IMAGE_EXTENSIONS)}) "
                       f"in {directory}")
    self.files = sorted(files)

  def __len__(self) -> int:
    return len(self.files)

  def get(self, i: int) -> dict[str, Any]:
    """Decodes image ``i``: ``{"image": PIL image, "label": -1, "id": relative path}``.

    Raises:
      data.images.CorruptImageError: (a ValueError) naming the file.
    """
    path = os.path.join(self.directory, self.files[i])
    return {"image": images.to_pil(path, path), "label": -1, "id": self.files[i]}

  def fingerprint(self) -> str:
    """Hash of the listing (relative paths, sizes, mtimes) for cache keys."""
    h = hashlib.sha256()
    for name in self.files:
      st = os.stat(os.path.join(self.directory, name))
      h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
