"""Training augmentation: torchvision ``RandomResizedCrop`` + ``RandomHorizontalFlip``.

The crop box follows torchvision's ``RandomResizedCrop.get_params`` exactly:
up to 10 attempts drawing an area fraction uniformly in ``scale`` and a log-
uniform aspect ratio in ``ratio``; ``w = int(round(sqrt(area * r)))``,
``h = int(round(sqrt(area / r)))``; accepted when ``0 < w <= W`` and
``0 < h <= H``, with a uniformly drawn top-left corner; otherwise the fallback
is a centre crop of the whole image clamped to the ratio bounds.

Randomness is a NumPy generator seeded from ``(seed, epoch, index)`` of the
example, so the augmentation of an example does not depend on the number of
workers, hosts, or the order in which examples are processed.

Example:
  >>> aug = make_train_augment("imagenet_bilinear", pre_resize=256)
  >>> x = aug(img, seed=0, epoch=3, index=1234)   # (224, 224, 3) float32
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

from sslbench_jax.data import preprocess


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation parameters.

  Attributes:
    size: output side of the random resized crop.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio (w / h), sampled log-uniformly.
    flip: probability of a horizontal flip.
    pre_resize: optional ``Resize`` of the shorter side before cropping (the
      "closer look" study uses 256); None crops the original image.
    square: None, "pad" or "crop", as in the evaluation presets.
    interpolation: filter of the crop's resize.
    mean, std: normalisation in ToTensor units.
  """
  size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  flip: float = 0.5
  pre_resize: int | None = None
  square: str | None = None
  interpolation: str = "bilinear"
  mean: tuple[float, float, float] = preprocess.IMAGENET_MEAN
  std: tuple[float, float, float] = preprocess.IMAGENET_STD

  def __post_init__(self):
    if not 0 < self.scale[0] <= self.scale[1]:
      raise ValueError(f"scale must be 0 < lo <= hi, got {self.scale}")
    if not 0 < self.ratio[0] <= self.ratio[1]:
      raise ValueError(f"ratio must be 0 < lo <= hi, got {self.ratio}")
    if not 0.0 <= self.flip <= 1.0:
      raise ValueError(f"flip must be a probability, got {self.flip}")


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator of one example's augmentation, independent of workers."""
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
      [int(seed), int(epoch), int(index)])))


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
  """torchvision's ``RandomResizedCrop.get_params``.

  Args:
    width, height: image size.
    rng: the example's generator.
    scale: area fraction range.
    ratio: aspect ratio range.

  Returns:
    ``(top, left, h, w)`` of the crop box.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


class TrainAugment:
  """Callable ``(img, *, seed, epoch, index) -> float32 (size, size, 3)``."""

  def __init__(self, config: AugmentConfig):
    self.config = config
    self._norm = preprocess.Preprocess(preprocess.PresetConfig(
        resize=None, crop=None, mean=config.mean, std=config.std))

  def geometry(self, img: Image.Image, *, seed: int, epoch: int,
               index: int) -> np.ndarray:
    """The augmented uint8 (size, size, 3) pixels."""
    c = self.config
    img = preprocess.square(preprocess.to_rgb(img), c.square)
    if c.pre_resize is not None:
      img = preprocess.resize_shorter(img, c.pre_resize, c.interpolation)
    rng = example_rng(seed, epoch, index)
    top, left, h, w = random_resized_crop_box(img.width, img.height, rng,
                                              c.scale, c.ratio)
    img = img.crop((left, top, left + w, top + h)).resize(
        (c.size, c.size), preprocess.INTERPOLATIONS[c.interpolation])
    if rng.random() < c.flip:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)

  def normalize(self, pixels: np.ndarray) -> np.ndarray:
    return self._norm.normalize(pixels)

  def __call__(self, img: Image.Image, *, seed: int, epoch: int,
               index: int) -> np.ndarray:
    return self.normalize(self.geometry(img, seed=seed, epoch=epoch, index=index))


def make_train_augment(preset: str = "imagenet_bilinear", **overrides: Any) -> TrainAugment:
  """Training augmentation matching an evaluation preset.

  Inherits square mode, interpolation, crop size and normalisation from the
  evaluation preset ``preset``; ``overrides`` set any ``AugmentConfig`` field.

  Args:
    preset: name of an evaluation preset (see ``preprocess.PRESETS``).
    **overrides: e.g. ``pre_resize=256``, ``scale=(0.2, 1.0)``.

  Returns:
    A ``TrainAugment``.
  """
  p = preprocess.preset_config(preset)
  valid = {f.name for f in dataclasses.fields(AugmentConfig)}
  unknown = set(overrides) - valid
  if unknown:
    raise ValueError(f"Unknown augmentation option(s) {sorted(unknown)}; valid: {sorted(valid)}")
  base = dict(size=p.crop or 224, square=p.square, interpolation=p.interpolation,
              mean=p.mean, std=p.std)
  return TrainAugment(AugmentConfig(**{**base, **overrides}))
