"""Preprocessing presets vs an independent torchvision-style reference.

The reference below re-implements torchvision's PIL code path from its
documented behaviour (``Resize`` via ``_compute_resized_output_size`` +
``PIL.Image.resize``; ``CenterCrop`` via ``ImageOps.expand`` padding +
``round`` anchors; ``ToTensor``/``Normalize`` in torch), without using the
package's helpers.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from sslbench_jax.data import augment
from sslbench_jax.data import preprocess

_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _tv_resize(img, size, interp):
  w, h = img.size
  if min(w, h) == w:
    ow, oh = size, int(size * h / w)
  else:
    oh, ow = size, int(size * w / h)
  if (ow, oh) == (w, h):
    return img
  return img.resize((ow, oh), _FILTERS[interp])


def _tv_center_crop(img, th, tw):
  w, h = img.size
  if tw > w or th > h:
    pad = [(tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0,
           (tw - w + 1) // 2 if tw > w else 0, (th - h + 1) // 2 if th > h else 0]
    img = ImageOps.expand(img, border=tuple(pad), fill=0)
    w, h = img.size
    if (w, h) == (tw, th):
      return img
  i = int(round((h - th) / 2.0))
  j = int(round((w - tw) / 2.0))
  return img.crop((j, i, j + tw, i + th))


def _reference_pixels(path_or_img, interp="bilinear", square=None, resize=256, crop=224):
  img = path_or_img if isinstance(path_or_img, Image.Image) else Image.open(path_or_img)
  img = img.convert("RGB")
  if square == "pad":
    s = max(img.size)
    img = _tv_center_crop(img, s, s)
  elif square == "crop":
    s = min(img.size)
    img = _tv_center_crop(img, s, s)
  img = _tv_resize(img, resize, interp)
  img = _tv_center_crop(img, crop, crop)
  return np.array(img)


def _torch_normalize(pixels, mean, std):
  t = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous().float().div(255)
  m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
  s = torch.tensor(std, dtype=torch.float32)[:, None, None]
  return ((t - m) / s).permute(1, 2, 0).numpy()


def _files(d, n=None):
  files = sorted(os.listdir(d))
  if n is not None:
    files = files[:: len(files) // n][:n]  # spread over classes
  return [os.path.join(d, f) for f in files]


def _check_pixels(ours, ref):
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  diff = np.abs(ours.astype(np.int32) - ref.astype(np.int32))
  assert diff.max() <= 1
  assert diff.mean() <= 0.05


def test_main_preset_all_1000_images(imagenet_samples_dir):
  fn = preprocess.get_preset("imagenet_bilinear")
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  files = _files(imagenet_samples_dir)
  assert len(files) == 1000
  n_gray = 0
  worst = 0.0
  for i, f in enumerate(files):
    img = Image.open(f)
    n_gray += img.mode == "L"
    ref = _reference_pixels(f)
    _check_pixels(fn.geometry(img), ref)
    if i % 10 == 0:  # full normalised output on a subset (pixels already equal)
      out = fn(Image.open(f))
      assert out.dtype == np.float32 and out.shape == (224, 224, 3)
      worst = max(worst, float(np.abs(out - _torch_normalize(ref, mean, std)).max()))
  assert n_gray == 23  # grayscale JPEGs went through convert("RGB")
  assert worst <= 1e-6


@pytest.mark.parametrize("name,interp,square,mean,std", [
    ("imagenet_bicubic", "bicubic", None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("pad_square", "bilinear", "pad", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("pad_square_bicubic", "bicubic", "pad", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("crop_square", "bilinear", "crop", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("crop_square_bicubic", "bicubic", "crop", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("no_norm", "bilinear", None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
])
def test_other_presets_subset(imagenet_samples_dir, name, interp, square, mean, std):
  fn = preprocess.get_preset(name)
  for f in _files(imagenet_samples_dir, 100):
    ref = _reference_pixels(f, interp, square)
    _check_pixels(fn.geometry(Image.open(f)), ref)
  out = fn(Image.open(f))
  np.testing.assert_allclose(out, _torch_normalize(ref, mean, std), atol=1e-6)


def test_efficientnet_lite_normalisation(imagenet_samples_dir):
  f = _files(imagenet_samples_dir, 3)[1]
  out = preprocess.get_preset("efficientnet_lite")(Image.open(f))
  ref = (_reference_pixels(f).astype(np.float64) - 127.0) / 128.0
  np.testing.assert_allclose(out, ref, atol=1e-6)


def test_no_norm_range_and_values():
  rng = np.random.default_rng(0)
  arr = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  out = preprocess.get_preset("no_norm")(Image.fromarray(arr))
  ref = _reference_pixels(Image.fromarray(arr)).astype(np.float64) / 255.0
  np.testing.assert_allclose(out, ref, atol=1e-7)
  assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("size,expected", [
    # (w, h) -> torchvision's Resize(256) output, computed by hand.
    ((500, 375), (341, 256)),   # int(256 * 500 / 375) = int(341.33)
    ((375, 500), (256, 341)),
    ((333, 500), (256, 384)),   # int(384.38)
    ((256, 300), (256, 300)),   # already right: untouched
    ((32, 32), (256, 256)),
    ((1000, 3), (85333, 256)),
])
def test_resize_sizes(size, expected):
  img = Image.new("RGB", size, (10, 20, 30))
  assert preprocess.resize_shorter(img, 256, "bilinear").size == expected


@pytest.mark.parametrize("h,expected_top", [
    (227, 2),   # (227 - 224) / 2 = 1.5 -> round half to even = 2
    (225, 0),   # 0.5 -> 0
    (229, 2),   # 2.5 -> 2
    (231, 4),   # 3.5 -> 4
    (224, 0),
])
def test_center_crop_rounding(h, expected_top):
  arr = np.repeat(np.arange(h, dtype=np.uint8)[:, None], 224, axis=1)
  img = Image.fromarray(np.stack([arr] * 3, -1))
  out = np.asarray(preprocess.center_crop(img, 224, 224))
  assert out.shape == (224, 224, 3)
  assert out[0, 0, 0] == expected_top


def test_center_crop_pads_with_zeros_like_torchvision():
  arr = np.full((5, 8, 3), 200, np.uint8)   # h=5, w=8
  out = np.asarray(preprocess.center_crop(Image.fromarray(arr), 10, 11))
  # pad left (11-8)//2 = 1, right 2; top (10-5)//2 = 2, bottom 3
  assert out.shape == (10, 11, 3)
  assert (out[2:7, 1:9] == 200).all()
  assert out[:2].sum() == 0 and out[7:].sum() == 0
  assert out[:, :1].sum() == 0 and out[:, 9:].sum() == 0


def test_pad_square_on_small_cifar_like_image():
  rng = np.random.default_rng(1)
  arr = rng.integers(0, 256, (20, 32, 3), dtype=np.uint8)
  img = Image.fromarray(arr)
  ours = preprocess.get_preset("pad_square").geometry(img)
  _check_pixels(ours, _reference_pixels(img, "bilinear", "pad"))


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_mode_conversion(mode):
  rng = np.random.default_rng(2)
  rgb = Image.fromarray(rng.integers(0, 256, (260, 300, 3), dtype=np.uint8))
  if mode == "I;16":
    img = Image.fromarray(rng.integers(0, 256, (260, 300), dtype=np.uint16))
    assert img.mode == "I;16"
  else:
    img = rgb.convert(mode)
  ours = preprocess.get_preset("imagenet_bilinear").geometry(img)
  assert ours.shape == (224, 224, 3)
  _check_pixels(ours, _reference_pixels(img))


def test_unknown_names_and_options():
  with pytest.raises(ValueError, match="imagenet_bilinear"):
    preprocess.get_preset("imagenet_bilinearr")
  with pytest.raises(ValueError, match="interpolation"):
    preprocess.get_preset("imagenet_bilinear", interp="bicubic")
  with pytest.raises(ValueError, match="bicubicc"):
    preprocess.make_preset(interpolation="bicubicc")


def test_overrides_and_describe():
  fn = preprocess.get_preset("imagenet_bicubic", resize=288, crop=256)
  img = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
  assert fn(img).shape == (256, 256, 3)
  d = preprocess.describe("pad_square")
  assert d["square"] == "pad" and d["resize"] == 256 and d["crop"] == 224
  assert d["torchvision"].startswith("CenterCrop(max side)")
  for name in preprocess.PRESETS:
    assert preprocess.describe(name)["name"] == name


# ----------------------------------------------------------------------------
# RandomResizedCrop


def _tv_rrc_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision get_params with the same draws from a NumPy generator."""
  area = height * width
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = int(round(np.sqrt(target_area * r)))
    h = int(round(np.sqrt(target_area / r)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def test_rrc_box_matches_reference_and_bounds():
  areas, ratios = [], []
  for idx in range(2000):
    box = augment.random_resized_crop_box(500, 375, augment.example_rng(7, 0, idx))
    assert box == _tv_rrc_box(500, 375, augment.example_rng(7, 0, idx))
    top, left, h, w = box
    assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
    areas.append(h * w / (500 * 375))
    ratios.append(w / h)
  areas, ratios = np.array(areas), np.array(ratios)
  # Rounding to integer sides moves bounds by < 1 pixel.
  assert areas.min() >= 0.08 * 0.98 and areas.max() <= 1.0
  assert ratios.min() >= 0.75 * 0.98 and ratios.max() <= (4 / 3) * 1.02
  # Accepted draws are uniform in area on [0.08, 1] except those rejected at
  # the large end, so the mean sits a bit below 0.54.
  assert 0.40 < areas.mean() < 0.56
  # On a square image rejections are symmetric in log-ratio, whose draws are
  # uniform on [log 3/4, log 4/3]: mean 0, std 0.166 (0.004 over 2000 draws).
  log_r = []
  for idx in range(2000):
    _, _, h, w = augment.random_resized_crop_box(400, 400, augment.example_rng(8, 1, idx))
    log_r.append(np.log(w / h))
  assert abs(np.mean(log_r)) < 0.02
  assert 0.14 < np.std(log_r) < 0.19


def test_rrc_fallback_extreme_aspect():
  # A 1000x10 image can never fit a box with ratio <= 4/3 and area >= 8%:
  # the fallback crop is centred with w = round(10 * 4/3) = 13.
  box = augment.random_resized_crop_box(1000, 10, augment.example_rng(0, 0, 0))
  assert box == (0, (1000 - 13) // 2, 10, 13)
  box = augment.random_resized_crop_box(10, 1000, augment.example_rng(0, 0, 0))
  assert box == ((1000 - 13) // 2, 0, 13, 10)


def test_augment_deterministic_and_pixel_exact():
  rng = np.random.default_rng(3)
  img = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
  aug = augment.make_train_augment("imagenet_bilinear", pre_resize=256)
  a = aug(img, seed=1, epoch=2, index=3)
  b = aug(img, seed=1, epoch=2, index=3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, aug(img, seed=1, epoch=3, index=3))
  assert not np.array_equal(a, aug(img, seed=1, epoch=2, index=4))
  # Independent pipeline: Resize(256) -> crop box -> resize(224) -> flip.
  r = _tv_resize(img, 256, "bilinear")
  g = augment.example_rng(1, 2, 3)
  top, left, h, w = _tv_rrc_box(r.width, r.height, g)
  ref = r.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
  if g.random() < 0.5:
    ref = ImageOps.mirror(ref)
  np.testing.assert_allclose(
      a, _torch_normalize(np.array(ref), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
      atol=1e-6)


def test_flip_rate():
  img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
  aug = augment.make_train_augment("no_norm", scale=(1.0, 1.0), ratio=(1.0, 1.0), size=64)
  flips = [aug.geometry(img, seed=0, epoch=0, index=i)[0, 0, 0] > 32 for i in range(400)]
  assert 0.4 < np.mean(flips) < 0.6


def _augment_with_workers(n_workers, n=24):
  import concurrent.futures
  rng = np.random.default_rng(4)
  imgs = [Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)) for _ in range(n)]
  aug = augment.make_train_augment("imagenet_bilinear", size=32)
  order = list(range(n))[::-1] if n_workers > 1 else list(range(n))
  with concurrent.futures.ThreadPoolExecutor(n_workers) as ex:
    outs = dict(zip(order, ex.map(
        lambda i: aug.geometry(imgs[i], seed=5, epoch=1, index=i), order)))
  return np.stack([outs[i] for i in range(n)])


def test_augment_independent_of_workers():
  np.testing.assert_array_equal(_augment_with_workers(1), _augment_with_workers(4))
