"""Pascal VOC 2012 as classification: majority object class of the segmentation mask.

The "closer look" study turns ``torchvision.datasets.VOCSegmentation`` (2012,
``train`` 1,464 / ``val`` 1,449) into a 21-way problem (index 0 =
"background", never a target): the label is the most frequent class in the
mask among classes 1..20, ignoring background (0) and void/boundary (255).
Ties go to the smaller class index (``np.bincount(...).argmax()``). A mask
without any object pixel is labelled 0 with a warning (none in VOC 2012).

Layout (the official ``VOCtrainval_11-May-2012.tar`` extracted)::

  <data_dir>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  <data_dir>/VOCdevkit/VOC2012/SegmentationClass/<id>.png
  <data_dir>/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt

``data_dir`` may also point at ``VOCdevkit`` or ``VOC2012`` directly. (TFDS's
``voc/2012`` is the detection set without masks, so it is not used.)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

VOID = 255
NUM_CLASSES = 21

_DOWNLOAD = ("download VOCtrainval_11-May-2012.tar from "
             "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and extract it there")


def majority_class(mask: np.ndarray) -> int:
  """Most frequent object class (1..20) of a VOC class mask; 0 if none.

  Args:
    mask: integer array of class ids (0 background, 1..20 objects, 255 void).

  Returns:
    The label.
  """
  m = np.asarray(mask).reshape(-1)
  objects = m[(m > 0) & (m < NUM_CLASSES)]
  if objects.size == 0:
    return 0
  return int(np.bincount(objects, minlength=NUM_CLASSES).argmax())


def find_voc2012(data_dir: str) -> str:
  """The ``VOC2012`` folder under ``data_dir``."""
  for cand in (os.path.join(data_dir, "VOCdevkit", "VOC2012"),
               os.path.join(data_dir, "VOC2012"), data_dir):
    if os.path.isdir(os.path.join(cand, "SegmentationClass")):
      return cand
  raise FileNotFoundError(f"Pascal VOC 2012 not found under {data_dir} (no "
                          f"VOCdevkit/VOC2012/SegmentationClass): {_DOWNLOAD}")


class VocSegmentationSource:
  """VOC 2012 segmentation split with majority-class labels."""

  def __init__(self, data_dir: str, split: str):
    self.root = find_voc2012(data_dir)
    list_file = os.path.join(self.root, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.isfile(list_file):
      raise FileNotFoundError(f"VOC split list {list_file} not found "
                              f"(splits: train, val, trainval)")
    with open(list_file) as f:
      self.ids = [line.strip() for line in f if line.strip()]

  def __len__(self) -> int:
    return len(self.ids)

  def label(self, index: int) -> int:
    mask_path = os.path.join(self.root, "SegmentationClass", self.ids[index] + ".png")
    if not os.path.isfile(mask_path):
      raise FileNotFoundError(f"VOC mask not found: {mask_path}")
    with Image.open(mask_path) as m:
      # Palette PNG: pixel values are class ids; don't let PIL map them to RGB.
      mask = np.asarray(m if m.mode in ("P", "L") else m.convert("L"))
    y = majority_class(mask)
    if y == 0:
      logging.warning("VOC mask %s has no object pixel; label 0", mask_path)
    return y

  def read(self, index: int) -> tuple[Any, Any, str]:
    image = os.path.join(self.root, "JPEGImages", self.ids[index] + ".jpg")
    return image, self.label(index), self.ids[index]
