"""Evaluation preprocessing presets with torchvision-exact semantics on PIL images.

A preset is a callable ``PIL.Image -> np.ndarray`` float32 ``(H, W, 3)``,
normalised, obtained with ``get_preset(name)``. Every step reproduces what
``torchvision.transforms`` does on a PIL image, so features match the PyTorch
pipelines the studies used:

1. RGB conversion like ``Image.convert("RGB")`` (grayscale, CMYK, palette, RGBA),
   which is what ``torchvision.datasets.folder.default_loader`` does.
2. Optional squaring: ``"pad"`` = ``CenterCrop(max(w, h))`` (torchvision pads with
   zeros, left/top getting the floor of half the padding), used for CUB and
   CIFAR; ``"crop"`` = ``CenterCrop(min(w, h))``, used for Pascal VOC.
3. ``Resize(s)``: shorter side to ``s``, longer side ``int(s * long / short)``,
   PIL ``resize`` with the given filter (PIL's bilinear/bicubic filters are
   antialiased when downscaling, as in torchvision's PIL path). An image that
   already has the target size is left untouched, as torchvision does.
4. ``CenterCrop(c)``: offsets ``int(round((h - c) / 2.0))`` (Python rounding),
   zero padding first if the image is smaller than the crop.
5. ``ToTensor`` (``uint8 / 255`` in float32) and ``Normalize(mean, std)``.

Each preset also exposes ``geometry(img) -> uint8 (H, W, 3)`` and
``normalize(uint8) -> float32`` separately, so an input pipeline can ship uint8
pixels to the accelerator and normalise there (4x less host->device traffic).

Example:
  >>> fn = get_preset("imagenet_bilinear")
  >>> x = fn(PIL.Image.open("cat.jpg"))   # (224, 224, 3) float32
  >>> describe("imagenet_bicubic")["torchvision"]
  'Resize(256, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))'
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite (TF ports) expect (pixel - 127) / 128 on 0..255 pixels;
# in ToTensor units that is mean 127/255, std 128/255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_SQUARE_MODES = (None, "pad", "crop")


@dataclasses.dataclass(frozen=True)
class PresetConfig:
  """Parameters of an evaluation preset (all torchvision-equivalent).

  Attributes:
    resize: target shorter side of ``Resize``; None skips resizing.
    crop: side of the final ``CenterCrop``; None skips cropping.
    interpolation: "bilinear", "bicubic", "nearest" or "lanczos".
    mean: per-channel mean in ToTensor units (0..1); zeros for no normalisation.
    std: per-channel std in ToTensor units; ones for no normalisation.
    square: None, "pad" (zero-pad to square) or "crop" (centre square crop),
      applied before ``Resize``.
  """
  resize: int | None = 256
  crop: int | None = 224
  interpolation: str = "bilinear"
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  square: str | None = None

  def __post_init__(self):
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f"Unknown interpolation {self.interpolation!r}; "
                       f"known: {', '.join(INTERPOLATIONS)}")
    if self.square not in _SQUARE_MODES:
      raise ValueError(f"Unknown square mode {self.square!r}; known: None, pad, crop")
    for name in ("resize", "crop"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v <= 0):
        raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f"mean/std must be 3 values (std > 0), got {self.mean}, {self.std}")


# One line per preset. The studies' eval pipelines: torchvision defaults
# (bilinear) for ResNets, bicubic for DINO/ViT checkpoints.
_PRESETS: dict[str, PresetConfig] = {
    "imagenet_bilinear": PresetConfig(),
    "imagenet_bicubic": PresetConfig(interpolation="bicubic"),
    "pad_square": PresetConfig(square="pad"),
    "pad_square_bicubic": PresetConfig(square="pad", interpolation="bicubic"),
    "crop_square": PresetConfig(square="crop"),
    "crop_square_bicubic": PresetConfig(square="crop", interpolation="bicubic"),
    "no_norm": PresetConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
    "efficientnet_lite": PresetConfig(mean=LITE_MEAN, std=LITE_STD),
    # Not a study preset: 32x32 inputs so `tiny=True` smoke configs run in seconds.
    "smoke_32": PresetConfig(resize=32, crop=32),
    # Not a study preset: the demo's digits (8x8 scans) at 64x64, normalised
    # for EfficientNet-Lite (the demo's real network).
    "lite_64": PresetConfig(resize=64, crop=64, mean=LITE_MEAN, std=LITE_STD),
}

PRESETS: tuple[str, ...] = tuple(_PRESETS)


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL mode to RGB exactly like ``img.convert("RGB")``."""
  return img if img.mode == "RGB" else img.convert("RGB")


def resize_shorter(img: Image.Image, size: int, interpolation: str) -> Image.Image:
  """torchvision ``Resize(size)`` (int size) on a PIL image."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) == (w, h):
    return img
  return img.resize((new_w, new_h), INTERPOLATIONS[interpolation])


def center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
  """torchvision ``CenterCrop((height, width))`` on a PIL image (zero pads)."""
  w, h = img.size
  if height > h or width > w:
    left = (width - w) // 2 if width > w else 0
    top = (height - h) // 2 if height > h else 0
    right = (width - w + 1) // 2 if width > w else 0
    bottom = (height - h + 1) // 2 if height > h else 0
    padded = Image.new(img.mode, (w + left + right, h + top + bottom), 0)
    padded.paste(img, (left, top))
    img = padded
    w, h = img.size
    if (w, h) == (width, height):
      return img
  top = int(round((h - height) / 2.0))
  left = int(round((w - width) / 2.0))
  return img.crop((left, top, left + width, top + height))


def square(img: Image.Image, mode: str | None) -> Image.Image:
  """The studies' squaring step: ``CenterCrop(max side)`` or ``CenterCrop(min side)``."""
  if mode is None:
    return img
  w, h = img.size
  s = max(w, h) if mode == "pad" else min(w, h)
  return center_crop(img, s, s)


class Preprocess:
  """A configured evaluation pipeline; call it on a PIL image."""

  def __init__(self, config: PresetConfig, name: str = "custom"):
    self.config = config
    self.name = name
    self._mean = np.asarray(config.mean, np.float32)
    self._std = np.asarray(config.std, np.float32)

  def geometry(self, img: Image.Image) -> np.ndarray:
    """RGB conversion, squaring, resize and crop; returns uint8 (H, W, 3)."""
    c = self.config
    img = square(to_rgb(img), c.square)
    if c.resize is not None:
      img = resize_shorter(img, c.resize, c.interpolation)
    if c.crop is not None:
      img = center_crop(img, c.crop, c.crop)
    return np.asarray(img, dtype=np.uint8)

  def normalize(self, pixels: np.ndarray) -> np.ndarray:
    """``ToTensor`` + ``Normalize`` in float32, channels last."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    return (x - self._mean) / self._std

  def __call__(self, img: Image.Image) -> np.ndarray:
    return self.normalize(self.geometry(img))

  def __repr__(self) -> str:
    return f"Preprocess({self.name!r}, {self.config})"


def make_preset(**kwargs: Any) -> Preprocess:
  """Builds a pipeline from ``PresetConfig`` fields (unknown keys rejected).

  Args:
    **kwargs: any of resize, crop, interpolation, mean, std, square.

  Returns:
    A ``Preprocess`` callable.
  """
  _check_keys(kwargs)
  return Preprocess(PresetConfig(**kwargs))


def get_preset(name: str, **overrides: Any) -> Preprocess:
  """Returns the named preset, optionally with some fields overridden.

  Args:
    name: one of ``PRESETS``.
    **overrides: ``PresetConfig`` fields to change (e.g. ``resize=288``).

  Returns:
    A ``Preprocess`` callable ``PIL.Image -> float32 (H, W, 3)``.
  """
  config = preset_config(name)
  if overrides:
    _check_keys(overrides)
    config = dataclasses.replace(config, **overrides)
  return Preprocess(config, name)


def preset_config(name: str) -> PresetConfig:
  """The ``PresetConfig`` of a named preset."""
  if name not in _PRESETS:
    raise ValueError(f"Unknown preprocessing preset {name!r}; known: {', '.join(PRESETS)}")
  return _PRESETS[name]


def describe(name: str) -> dict[str, Any]:
  """Provenance of a preset: its fields and the equivalent torchvision pipeline.

  Args:
    name: one of ``PRESETS``.

  Returns:
    A JSON-serialisable dict (``name``, config fields, ``torchvision``).
  """
  c = preset_config(name)
  return {"name": name, **dataclasses.asdict(c), "torchvision": torchvision_string(c)}


def torchvision_string(c: PresetConfig) -> str:
  """Human-readable torchvision equivalent of ``c``."""
  steps = []
  if c.square == "pad":
    steps.append("CenterCrop(max side) [zero-pad to square]")
  elif c.square == "crop":
    steps.append("CenterCrop(min side)")
  if c.resize is not None:
    steps.append(f"Resize({c.resize}, {c.interpolation})")
  if c.crop is not None:
    steps.append(f"CenterCrop({c.crop})")
  steps.append("ToTensor")
  if tuple(c.mean) != (0.0, 0.0, 0.0) or tuple(c.std) != (1.0, 1.0, 1.0):
    mean = ", ".join(f"{m:.4g}" for m in c.mean)
    std = ", ".join(f"{s:.4g}" for s in c.std)
    steps.append(f"Normalize(mean=({mean}), std=({std}))")
  return " -> ".join(steps)


def _check_keys(kwargs: dict[str, Any]) -> None:
  valid = {f.name for f in dataclasses.fields(PresetConfig)}
  unknown = set(kwargs) - valid
  if unknown:
    raise ValueError(f"Unknown preprocessing option(s) {sorted(unknown)}; "
                     f"valid: {sorted(valid)}")
