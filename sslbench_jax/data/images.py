"""Image decoding shared by all sources, with a clear error for corrupt files.

A source hands over an "image-like": a file path, encoded bytes (JPEG/PNG as
stored by TFDS), a uint8 array (IDX, scikit-learn, decoded TFDS features) or a
PIL image. ``to_pil`` turns any of them into a fully decoded PIL image, so a
truncated file fails here (naming the file) and not somewhere inside a batch.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image


class CorruptImageError(ValueError):
  """An image that cannot be decoded; the message names the example."""


def to_pil(image: Any, name: str) -> Image.Image:
  """Decodes an image-like into a loaded PIL image (mode unchanged).

  Args:
    image: path (str / os.PathLike), bytes, uint8 ndarray (HW or HWC) or PIL image.
    name: file name or example id, used in error messages.

  Returns:
    A PIL image whose pixels are loaded.

  Raises:
    CorruptImageError: the data cannot be decoded (truncated, not an image).
    FileNotFoundError: a path does not exist.
  """
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, np.ndarray):
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    return Image.fromarray(np.ascontiguousarray(image))
  if isinstance(image, (str, os.PathLike)):
    if not os.path.exists(image):
      raise FileNotFoundError(f"Image file not found: {image}")
    fobj = open(image, "rb")  # pylint: disable=consider-using-with
  elif isinstance(image, (bytes, bytearray, memoryview)):
    fobj = io.BytesIO(image)
  else:
    raise TypeError(f"{name}: unsupported image type {type(image).__name__}")
  try:
    with fobj:
      img = Image.open(fobj)
      img.load()   # decode now: truncation errors surface here
      return img
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptImageError(f"Cannot decode image {name}: {e}") from e
