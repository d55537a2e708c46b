"""Dataset registry, sources, corrupt-image policy and training augmentation.

TFDS-backed entries are tested two ways: with ``tfds.testing.mock_data``
(which backs ``tfds.data_source`` without TensorFlow, decoded images only) and
with a tiny real ArrayRecord dataset built here by a custom TFDS builder and
installed under the real dataset names (``imagenet2012/5.1.0``, ...), which
exercises the raw-JPEG-bytes path used on real data.
"""

import collections
import gzip
import io
import json
import os
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from sslbench_jax.data import array_source
from sslbench_jax.data import augment
from sslbench_jax.data import images
from sslbench_jax.data import label_spaces
from sslbench_jax.data import preprocess
from sslbench_jax.data import registry
from sslbench_jax.data import sharding
from sslbench_jax.data import voc_source

tfds = pytest.importorskip("tensorflow_datasets")

MEAN, STD = np.array((0.485, 0.456, 0.406)), np.array((0.229, 0.224, 0.225))


def _jpeg(seed, h, w, mode="RGB"):
  rng = np.random.default_rng(seed)
  img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
  b = io.BytesIO()
  img.save(b, "JPEG", quality=90)
  return b.getvalue()


def _reference(data, square=None):
  """torchvision-style eval pipeline, written independently of the package."""
  img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB")
  if square:
    w, h = img.size
    s = max(w, h) if square == "pad" else min(w, h)
    if square == "pad":
      canvas = Image.new("RGB", (s, s))
      canvas.paste(img, ((s - w) // 2, (s - h) // 2))
      img = canvas
    else:
      t, l = int(round((h - s) / 2)), int(round((w - s) / 2))
      img = img.crop((l, t, l + s, t + s))
  w, h = img.size
  size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
  if size != (w, h):
    img = img.resize(size, Image.BILINEAR)
  w, h = img.size
  t, l = int(round((h - 224) / 2)), int(round((w - 224) / 2))
  x = np.asarray(img.crop((l, t, l + 224, t + 224)), np.float64) / 255
  return (x - MEAN) / STD


# ---------------------------------------------------------------------------
# A tiny real ArrayRecord dataset with ImageNet-style features.

_VAL_FILES = {f"ILSVRC2012_val_{i:08d}.JPEG": _jpeg(i, 200 + 7 * i, 260 - 5 * i)
              for i in (1, 2, 3, 4, 22, 23)}  # ReaL sets of val #1 and #22 are empty
_META = os.path.join(os.path.dirname(label_spaces.__file__), "meta")
with open(os.path.join(_META, "val_image_to_1k_label.json")) as _f:
  _VAL_LABELS = {k: v for k, v in json.load(_f).items() if k in _VAL_FILES}


class SslbenchTinyInet(tfds.core.GeneratorBasedBuilder):
  """ImageNet-like features; written with JPEG bytes (no TensorFlow needed)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "file_name": tfds.features.Text(),
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=1000)}))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples(), "test": self._generate_examples()}

  def _generate_examples(self):
    for name, data in _VAL_FILES.items():
      yield name, {"file_name": name, "image": data, "label": _VAL_LABELS[name]}


def _install(built, data_dir, tfds_name, version, split_rename=None):
  """Copies the tiny dataset under a real TFDS name/version."""
  dst = os.path.join(data_dir, *tfds_name.split("/"), version)
  os.makedirs(dst)
  base = tfds_name.split("/")[0]
  for f in os.listdir(built):
    shutil.copy(os.path.join(built, f), os.path.join(dst, f.replace("sslbench_tiny_inet", base)))
  path = os.path.join(dst, "dataset_info.json")
  with open(path) as f:
    info = json.load(f)
  info.update(name=base, version=version)
  if "/" in tfds_name:
    info["configName"] = tfds_name.split("/")[1]
  with open(path, "w") as f:
    json.dump(info, f)


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  builder = SslbenchTinyInet(data_dir=os.path.join(root, "build"), file_format="array_record")
  builder.download_and_prepare()
  built = os.path.join(root, "build", "sslbench_tiny_inet", "1.0.0")
  data_dir = os.path.join(root, "data")
  for name, version in (("imagenet2012", "5.1.0"), ("imagenet_r", "0.2.0"),
                        ("imagenet_v2/matched-frequency", "3.0.0")):
    _install(built, data_dir, name, version)
  return data_dir


def test_tfds_imagenet_raw_bytes_path(tiny_tfds_dir):
  ds = registry.open_dataset("imagenet1k", "validation", data_dir=tiny_tfds_dir, source="tfds")
  assert len(ds) == 6 and ds.label_space.num_classes == 1000
  seen = set()
  for i in range(len(ds)):
    ex = ds.get(i)
    seen.add(ex["id"])
    assert ex["label"] == _VAL_LABELS[ex["id"]]
    np.testing.assert_allclose(ex["image"], _reference(_VAL_FILES[ex["id"]]), atol=1e-5)
  assert seen == set(_VAL_FILES)


def test_tfds_real_excludes_empty_sets(tiny_tfds_dir):
  ds = registry.open_dataset("imagenet_real", "validation", data_dir=tiny_tfds_dir,
                             source="tfds")
  with open(os.path.join(_META, "imagenet_real_labels.json")) as f:
    real = json.load(f)
  expected = {n for n in _VAL_FILES if real[int(n[15:23]) - 1]}
  assert len(expected) == 4   # val #1 and #22 have empty ReaL sets
  got = {}
  for i in range(len(ds)):
    ex = ds.get(i)
    assert ex["label"].dtype == np.int8 and ex["label"].shape == (1000,)
    got[ex["id"]] = set(np.flatnonzero(ex["label"]).tolist())
  assert set(got) == expected
  for name, labels in got.items():
    assert labels == set(real[int(name[15:23]) - 1])
  assert ds.label_space.multi_label and ds.label_space.metric == "real_top1"
  # The id index is cached for the next open.
  cache = os.path.join(tiny_tfds_dir, "sslbench_cache")
  assert len(os.listdir(cache)) == 1


def test_tfds_subset_and_v2_entries(tiny_tfds_dir):
  r = registry.open_dataset("imagenet_r", "test", data_dir=tiny_tfds_dir)
  assert r.label_space.subset == label_spaces.imagenet_r_indices()
  assert r.label_space.metrics == ("subset_top1", "top1")
  assert {r.get(i)["label"] for i in range(len(r))} == set(_VAL_LABELS.values())
  v2 = registry.open_dataset("imagenet_v2", "test", data_dir=tiny_tfds_dir)
  assert len(v2) == 6 and v2.label_space.metric == "top1"


def test_tfds_not_prepared_message(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    registry.open_dataset("imagenet1k", "validation", data_dir=str(tmp_path), source="tfds")
  msg = str(e.value)
  assert "imagenet2012" in msg and "tfds build" in msg and "ILSVRC2012_img_val.tar" in msg
  assert "\n" not in msg
  with pytest.raises(FileNotFoundError, match="config=threshold-0.7"):
    registry.open_dataset("imagenet_v2_threshold", "test", data_dir=str(tmp_path))


# Registry entries backed by TFDS: num classes, metric, preset, feature keys.
_TFDS_ENTRIES = {
    # name: (split, num_classes, metric, preset)
    "imagenet1k": ("validation", 1000, "top1", "imagenet_bilinear"),
    "imagenet_v2": ("test", 1000, "top1", "imagenet_bilinear"),
    "imagenet_v2_threshold": ("test", 1000, "top1", "imagenet_bilinear"),
    "imagenet_v2_top": ("test", 1000, "top1", "imagenet_bilinear"),
    "imagenet_r": ("test", 1000, "subset_top1", "imagenet_bilinear"),
    "imagenet_a": ("test", 1000, "subset_top1", "imagenet_bilinear"),
    "imagenet_sketch": ("test", 1000, "top1", "imagenet_bilinear"),
    "cub200": ("test", 200, "top1", "pad_square"),
    "cifar100": ("test", 100, "top1", "pad_square"),
    **{f"domainnet_{d}": ("test", 345, "top1", "imagenet_bilinear")
       for d in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")},
}


@pytest.mark.parametrize("name", sorted(_TFDS_ENTRIES))
def test_tfds_entries_with_mock_data(name):
  split, num_classes, metric, preset = _TFDS_ENTRIES[name]
  with tfds.testing.mock_data(num_examples=3):
    ds = registry.open_dataset(name, split, preprocessing="no_norm")
    assert len(ds) == 3
    ex = ds.get(2)
  assert ds.label_space.num_classes == num_classes == len(ds.label_space.class_names)
  assert ds.label_space.metric == metric
  assert registry.get_spec(name).preprocessing == preset
  assert ex["image"].shape == (224, 224, 3) and ex["image"].dtype == np.float32
  assert 0.0 <= ex["image"].min() and ex["image"].max() <= 1.0
  assert 0 <= ex["label"] < num_classes
  assert isinstance(ex["id"], str) and ex["id"]


def test_class_names_from_tfds():
  # DomainNet's names are in the builder code; CIFAR/CUB store theirs with the
  # prepared data (the code only knows the count).
  dn = registry.get_spec("domainnet_clipart").label_space(None)
  assert dn.class_names[:3] == ("aircraft_carrier", "airplane", "alarm_clock")
  assert len(set(dn.class_names)) == 345
  assert len(set(registry.get_spec("cub200").label_space(None).class_names)) == 200


# ---------------------------------------------------------------------------
# Every registry entry: label space and metric.

_ALL = {
    # name: (num_classes or None if data-defined, multi_label, metrics, subset size)
    "imagenet1k": (1000, False, ("top1",), None),
    "imagenet_real": (1000, True, ("real_top1",), None),
    "imagenet_v2": (1000, False, ("top1",), None),
    "imagenet_v2_threshold": (1000, False, ("top1",), None),
    "imagenet_v2_top": (1000, False, ("top1",), None),
    "imagenet_r": (1000, False, ("subset_top1", "top1"), 200),
    "imagenet_a": (1000, False, ("subset_top1", "top1"), 200),
    "imagenet_sketch": (1000, False, ("top1",), None),
    "imagenet_samples": (1000, False, ("top1",), None),
    # Tsipras et al.'s 9 "Restricted ImageNet" superclasses of the samples (demo).
    "imagenet_samples_restricted": (9, False, ("top1",), None),
    "inat2021_mini_family": (1103, False, ("top1",), None),
    "cub200": (200, False, ("top1",), None),
    "voc2012": (21, False, ("top1",), None),
    "cifar100": (100, False, ("top1",), None),
    **{f"domainnet_{d}": (345, False, ("top1",), None)
       for d in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")},
    "fashion_mnist": (10, False, ("top1",), None),
    "fashion_mnist_small": (10, False, ("top1",), None),
    "digits": (10, False, ("top1",), None),
    "folder": (None, False, ("top1",), None),
    "csv": (None, False, ("top1",), None),
}


def test_registry_covers_every_entry():
  assert set(registry.DATASETS) == set(_ALL)


@pytest.mark.parametrize("name", sorted(_ALL))
def test_label_space_of_every_entry(name):
  num_classes, multi, metrics, subset = _ALL[name]
  info = registry.get_spec(name).info()
  json.dumps(info)
  if num_classes is None:
    assert info["label_space"] is None   # classes come from the data
    return
  ls = info["label_space"]
  assert ls["num_classes"] == num_classes
  assert ls["multi_label"] == multi
  assert tuple(ls["metrics"]) == metrics
  assert ls["subset_size"] == subset
  # the class subset itself travels in feature files (scoring needs no registry)
  assert len(ls["subset"]) == subset if subset else "subset" not in ls


def test_unknown_names():
  with pytest.raises(ValueError, match="imagenet1k.*cifar100"):
    registry.open_dataset("imagenet", "val")
  with pytest.raises(ValueError, match="validation"):
    registry.open_dataset("imagenet1k", "valid")
  with pytest.raises(ValueError, match="tfds"):
    registry.open_dataset("digits", "test", source="hdf5")
  with pytest.raises(ValueError, match="data_dir"):
    registry.open_dataset("voc2012", "val")


# ---------------------------------------------------------------------------
# Folder, CSV, ImageNet folder layouts.


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def test_folder_source_imagefolder_order(tmp_path):
  files = {"b_class/2.jpg": 3, "b_class/10.jpg": 4, "a_class/z.jpeg": 1,
           "a_class/sub/y.png": 2, "c_class/x.JPG": 5, "a_class/sub-x/w.jpg": 6,
           "a_class/sub/deeper/v.jpg": 7}
  for rel, seed in files.items():
    img = Image.open(io.BytesIO(_jpeg(seed, 40, 50)))
    b = io.BytesIO()
    img.save(b, "PNG" if rel.endswith("png") else "JPEG")
    _write(str(tmp_path / "train" / rel), b.getvalue())
  _write(str(tmp_path / "train" / "a_class" / "notes.txt"), b"not an image")
  ds = registry.open_dataset("folder", "train", data_dir=str(tmp_path), preprocessing="no_norm")
  assert ds.label_space.class_names == ("a_class", "b_class", "c_class")
  got = [(ds.get(i)["id"], ds.get(i)["label"]) for i in range(len(ds))]
  # ImageFolder: classes sorted; within a class, sorted(os.walk(...)) order of
  # directories ("sub" < "sub-x" < "sub/deeper"), files sorted as strings.
  assert got == [("a_class/z.jpeg", 0), ("a_class/sub/y.png", 0), ("a_class/sub-x/w.jpg", 0),
                 ("a_class/sub/deeper/v.jpg", 0), ("b_class/10.jpg", 1),
                 ("b_class/2.jpg", 1), ("c_class/x.JPG", 2)]
  x = ds.get(4)["image"]
  ref = _reference(str(tmp_path / "train" / "b_class" / "10.jpg")) * STD + MEAN
  np.testing.assert_allclose(x, ref, atol=1e-5)


def test_csv_source(tmp_path):
  for i in range(4):
    _write(str(tmp_path / "imgs" / f"{i}.jpg"), _jpeg(i, 30, 30))
  (tmp_path / "test.csv").write_text(
      "path,label\nimgs/0.jpg,dog\nimgs/1.jpg,cat\n" + f"{tmp_path}/imgs/2.jpg,dog\nimgs/3.jpg,ant\n")
  ds = registry.open_dataset("csv", "test", data_dir=str(tmp_path))
  assert ds.label_space.class_names == ("ant", "cat", "dog")
  assert [ds.get(i)["label"] for i in range(4)] == [2, 1, 2, 0]
  (tmp_path / "ints.csv").write_text("imgs/0.jpg,4\nimgs/1.jpg,0\n")
  ds = registry.open_dataset("csv", "train", data_dir=str(tmp_path / "ints.csv"))
  assert ds.label_space.num_classes == 5 and [ds.get(i)["label"] for i in range(2)] == [4, 0]
  with pytest.raises(FileNotFoundError, match="val.csv"):
    registry.open_dataset("csv", "val", data_dir=str(tmp_path))


def test_imagenet_folder_layouts(tmp_path):
  wnids = label_spaces.imagenet_wnids()
  # val as <wnid>/ folders, and a flat val folder with labels from the meta json.
  for name, data in _VAL_FILES.items():
    _write(str(tmp_path / "a" / "val" / wnids[_VAL_LABELS[name]] / name), data)
    _write(str(tmp_path / "b" / "val" / name), data)
  for root in ("a", "b"):
    ds = registry.open_dataset("imagenet1k", "val", data_dir=str(tmp_path / root))
    assert len(ds) == 6
    for i in range(len(ds)):
      ex = ds.get(i)
      assert ex["label"] == _VAL_LABELS[os.path.basename(ex["id"])]
    real = registry.open_dataset("imagenet_real", "val", data_dir=str(tmp_path / root))
    assert len(real) == 4
  # ImageNet-R style: 200-wnid folders keep 1000-space labels.
  r_wnids = [wnids[i] for i in label_spaces.imagenet_r_indices()]
  for k, w in enumerate(r_wnids[:3]):
    _write(str(tmp_path / "r" / w / "x.jpg"), _jpeg(k, 30, 40))
  ds = registry.open_dataset("imagenet_r", "test", data_dir=str(tmp_path / "r"))
  assert [ds.get(i)["label"] for i in range(3)] == list(label_spaces.imagenet_r_indices()[:3])
  # ImageNet-v2 style: folders "0".."999" are class indices, not sorted names.
  for c in ("0", "10", "2", "999"):
    _write(str(tmp_path / "v2" / c / "h.jpeg"), _jpeg(int(c), 30, 40))
  ds = registry.open_dataset("imagenet_v2", "test", data_dir=str(tmp_path / "v2"))
  assert sorted(ds.get(i)["label"] for i in range(4)) == [0, 2, 10, 999]
  assert all(ds.get(i)["label"] == int(ds.get(i)["id"].split("/")[0]) for i in range(4))


# ---------------------------------------------------------------------------
# Corrupt images.


def test_corrupt_image_error_and_skip(tmp_path):
  good = _jpeg(0, 64, 64)
  _write(str(tmp_path / "c" / "cls" / "a_good.jpg"), good)
  _write(str(tmp_path / "c" / "cls" / "b_truncated.jpg"), good[: len(good) // 2])
  _write(str(tmp_path / "c" / "cls" / "c_garbage.jpg"), b"\x00" * 100)
  ds = registry.open_dataset("folder", "train", data_dir=str(tmp_path / "c"))
  ds.get(0)
  with pytest.raises(images.CorruptImageError, match="b_truncated.jpg"):
    ds.get(1)
  with pytest.raises(ValueError, match="on_corrupt"):
    registry.open_dataset("folder", "train", data_dir=str(tmp_path / "c"), on_corrupt="ignore")
  ds = registry.open_dataset("folder", "train", data_dir=str(tmp_path / "c"), on_corrupt="skip")
  got = [ds.get(i) for i in range(len(ds))]
  assert [e["mask"] for e in got] == [True, False, False]
  assert [e["index"] for e in got] == [0, 1, 2]
  assert got[0]["image"].any() and not any(e["image"].any() for e in got[1:])
  assert all(e["image"].shape == got[0]["image"].shape for e in got)
  report = ds.corrupt_report()
  assert report["num_corrupt"] == 2
  assert [e["id"] for e in report["examples"]] == ["cls/b_truncated.jpg", "cls/c_garbage.jpg"]


def test_missing_file_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    images.to_pil(str(tmp_path / "nope.jpg"), "nope.jpg")


# ---------------------------------------------------------------------------
# IDX (Fashion-MNIST) and digits.


def _write_idx(path, arr, code):
  header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
  data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)


def test_idx_reader_generated(tmp_path):
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 7).astype(np.uint8)
  ints = rng.integers(-1000, 1000, (3, 4)).astype(np.int32)
  _write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), imgs, 0x08)
  _write_idx(str(tmp_path / "train-labels-idx1-ubyte"), labels, 0x08)
  _write_idx(str(tmp_path / "i.idx"), ints, 0x0C)
  np.testing.assert_array_equal(array_source.read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), imgs)
  np.testing.assert_array_equal(array_source.read_idx(str(tmp_path / "i.idx")), ints)
  ds = registry.open_dataset("fashion_mnist", "train", data_dir=str(tmp_path),
                             preprocessing="no_norm")
  assert len(ds) == 7
  ex = ds.get(3)
  assert ex["label"] == labels[3]
  ref = np.asarray(Image.fromarray(imgs[3]).convert("RGB").resize((256, 256), Image.BILINEAR))
  np.testing.assert_allclose(ex["image"], ref[16:240, 16:240] / 255.0, atol=1e-6)
  (tmp_path / "bad.idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
  with pytest.raises(ValueError, match="truncated"):
    array_source.read_idx(str(tmp_path / "bad.idx"))
  with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
    registry.open_dataset("fashion_mnist", "test", data_dir=str(tmp_path))


def test_fashion_mnist_real_files():
  if not os.path.isdir(array_source.FASHION_MNIST_DIR):
    pytest.skip(f"{array_source.FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")
  train = registry.open_dataset("fashion_mnist", "train")
  test = registry.open_dataset("fashion_mnist", "test")
  assert (len(train), len(test)) == (60000, 10000)
  # Fashion-MNIST is balanced: 6,000 / 1,000 images per class.
  assert collections.Counter(test.source.labels.tolist()) == {c: 1000 for c in range(10)}
  assert collections.Counter(train.source.labels.tolist()) == {c: 6000 for c in range(10)}
  assert test.source.images.shape == (10000, 28, 28)


def test_digits_against_sklearn():
  from sklearn import datasets
  d = datasets.load_digits()
  test = registry.open_dataset("digits", "test", preprocessing=preprocess.make_preset(
      resize=None, crop=None, mean=(0, 0, 0), std=(1, 1, 1)))
  train = registry.open_dataset("digits", "train")
  assert len(test) + len(train) == 1797 and len(test) == 360
  ex = test.get(7)   # the 8th test image = sklearn image 35
  np.testing.assert_allclose(ex["image"][..., 0], np.round(d.images[35] * 255 / 16) / 255, atol=1e-7)
  assert ex["label"] == d.target[35]


# ---------------------------------------------------------------------------
# VOC majority class and iNaturalist families.


def _palette_png(mask):
  img = Image.fromarray(mask.astype(np.uint8), "P")
  img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
  b = io.BytesIO()
  img.save(b, "PNG")
  return b.getvalue()


def test_voc_majority_class(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "VOCdevkit" / "VOC2012"
  ids, expected = [], []
  for k in range(12):
    mask = np.zeros((40, 50), np.uint8)
    mask[rng.random(mask.shape) < 0.3] = 255   # void pixels never count
    for c in rng.choice(np.arange(1, 21), 3, replace=False):
      mask[rng.random(mask.shape) < rng.uniform(0.05, 0.2)] = c
    if k == 0:
      mask[:] = 0
      mask[:20] = 255
      mask[0, :3] = 7          # background and void outnumber class 7
    if k == 1:
      mask[:] = 0
      mask[0, :4] = 3
      mask[1, :4] = 9          # a tie -> smaller class index
    counts = collections.Counter(int(v) for v in mask.reshape(-1) if 0 < v < 255)
    best = max(counts.values())
    expected.append(min(c for c, n in counts.items() if n == best))
    name = f"2007_{k:06d}"
    ids.append(name)
    _write(str(root / "SegmentationClass" / f"{name}.png"), _palette_png(mask))
    _write(str(root / "JPEGImages" / f"{name}.jpg"), _jpeg(k, 40, 50))
  assert expected[:2] == [7, 3]
  _write(str(root / "ImageSets" / "Segmentation" / "val.txt"), "\n".join(ids).encode())
  ds = registry.open_dataset("voc2012", "val", data_dir=str(tmp_path))
  assert ds.label_space.num_classes == 21 and ds.label_space.class_names[0] == "background"
  assert [ds.get(i)["label"] for i in range(len(ds))] == expected
  assert ds.preprocessing.config.square == "crop"
  assert voc_source.majority_class(np.full((3, 3), 255)) == 0
  with pytest.raises(FileNotFoundError, match="VOCtrainval_11-May-2012.tar"):
    registry.open_dataset("voc2012", "val", data_dir=str(tmp_path / "nothing"))


def test_inaturalist_family_labels(tmp_path):
  # species folders: id_kingdom_phylum_class_order_family_genus_species
  taxa = [("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax"),
          ("Animalia", "Chordata", "Aves", "Passeriformes", "Paridae", "Parus", "major"),
          ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "pica"),
          ("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Rosaceae", "Rosa", "canina")]
  for k, t in enumerate(taxa):
    for split in ("2021_train_mini", "2021_valid"):
      _write(str(tmp_path / split / f"{k:05d}_{'_'.join(t)}" / f"{k}.jpg"), _jpeg(k, 30, 30))
  ds = registry.open_dataset("inat2021_mini_family", "train", data_dir=str(tmp_path))
  assert ds.label_space.class_names == ("Corvidae", "Paridae", "Rosaceae")
  assert [ds.get(i)["label"] for i in range(4)] == [0, 0, 1, 2]   # sorted by label
  assert sorted(ds.get(i)["id"].split("/")[0][:5] for i in range(4)) == ["00000", "00001", "00002", "00003"]
  val = registry.open_dataset("inat2021_mini_family", "val", data_dir=str(tmp_path))
  assert val.label_space.class_names == ds.label_space.class_names
  os.rename(tmp_path / "2021_valid" / f"00003_{'_'.join(taxa[3])}", tmp_path / "2021_valid" / "00007_x")
  with pytest.raises(ValueError, match="00007_x"):
    registry.open_dataset("inat2021_mini_family", "val", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------
# Training augmentation through the dataset.


def test_dataset_train_augment_epochs():
  aug = augment.make_train_augment("no_norm", size=16)
  ds = registry.open_dataset("digits", "test", preprocessing=aug, seed=3)
  b0 = np.stack([ds.get(i, epoch=0)["image"] for i in range(8)])
  b0_again = np.stack([ds.get(i, epoch=0)["image"] for i in reversed(range(8))])[::-1]
  b1 = np.stack([ds.get(i, epoch=1)["image"] for i in range(8)])
  np.testing.assert_array_equal(b0, b0_again)
  assert not np.array_equal(b0, b1)
  assert b0.shape == (8, 16, 16, 3)
  # the augmentation of example i in epoch e is the one seeded (seed, e, i)
  raw = registry.open_dataset("digits", "test", preprocessing="no_norm")
  for i in (0, 5):
    img = images.to_pil(*[raw.source.read(i)[k] for k in (0, 2)])
    np.testing.assert_array_equal(b1[i], aug(img, seed=3, epoch=1, index=i))
  assert ds.describe()["preprocessing_detail"]["seed"] == 3
