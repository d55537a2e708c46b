"""In-memory image arrays: IDX files (Fashion-MNIST) and scikit-learn digits.

IDX format (LeCun's MNIST files): big-endian header ``0, 0, dtype code, ndim``,
then ``ndim`` uint32 sizes, then the data; ``.gz`` files are read transparently.

Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` installs
``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` under
``/usr/share/datasets/fashion-mnist``.

scikit-learn digits: 1,797 8x8 images with values 0..16, scaled to 0..255
(``round(v * 255 / 16)``); split deterministically: test = every 5th image
(360), train = the rest (1,437).
"""

from __future__ import annotations

import gzip
import os
from typing import Any

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped).

  Args:
    path: file path.

  Returns:
    The array, native byte order.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"IDX file not found: {path}")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic {data[:4]!r})")
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int(x) for x in np.frombuffer(data, ">u4", ndim, 4))
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(f"{path}: truncated or oversized IDX file ({len(data)} bytes, "
                     f"expected {expected} for shape {shape})")
  arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return arr.astype(dtype.newbyteorder("="))


class ArraySource:
  """Images (N, H, W[, C]) uint8 with integer labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, prefix: str):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images = images
    self.labels = labels
    self.prefix = prefix

  def __len__(self) -> int:
    return len(self.images)

  def read(self, index: int) -> tuple[Any, Any, str]:
    return self.images[index], int(self.labels[index]), f"{self.prefix}/{index}"


def fashion_mnist(split: str, data_dir: str | None = None) -> ArraySource:
  """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) from IDX files."""
  data_dir = data_dir or FASHION_MNIST_DIR
  stem = {"train": "train", "test": "t10k"}[split]
  paths = [os.path.join(data_dir, f"{stem}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
  paths = [p if os.path.exists(p) else p + ".gz" for p in paths]
  for p in paths:
    if not os.path.exists(p):
      raise FileNotFoundError(
          f"Fashion-MNIST file {p} not found. Install the Debian package "
          f"(apt-get install dataset-fashion-mnist -> {FASHION_MNIST_DIR}) or put "
          f"the four *-ubyte[.gz] files from github.com/zalandoresearch/fashion-mnist "
          f"in a folder and pass data_dir=")
  return ArraySource(read_idx(paths[0]), read_idx(paths[1]), split)


def digits(split: str) -> ArraySource:
  """scikit-learn's 8x8 digits as uint8 images (see module docstring)."""
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("The 'digits' dataset needs scikit-learn: pip install scikit-learn") from None
  d = datasets.load_digits()
  pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
  test = np.arange(len(pixels)) % 5 == 0
  keep = test if split == "test" else ~test
  return ArraySource(pixels[keep], d.target[keep], split)
