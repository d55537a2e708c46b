"""Dataset registry: name -> source, splits, label space, metric, preprocessing.

``open_dataset(name, split, data_dir=..., preprocessing=..., source=...)``
returns a ``dataset.Dataset``. ``source`` picks the backend where there is a
choice: "tfds" (prepared ArrayRecord under ``data_dir``), "folder" (files
under ``data_dir``), or "auto" (the folder layout if ``data_dir`` holds it,
else TFDS). See docs/datasets.md for the download/prepare commands.

Names (``DATASETS``): ImageNet-1k and its test sets (``imagenet1k``,
``imagenet_real``, ``imagenet_v2`` / ``_threshold`` / ``_top``, ``imagenet_r``,
``imagenet_a``, ``imagenet_sketch``), the "closer look" transfer sets
(``inat2021_mini_family``, ``cub200``, ``voc2012``, ``cifar100``,
``domainnet_<domain>``), small offline sets (``fashion_mnist``, ``digits``),
and generic ``folder`` / ``csv``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable

from sslbench_jax.data import array_source
from sslbench_jax.data import dataset as dataset_lib
from sslbench_jax.data import folder_source
from sslbench_jax.data import inaturalist_source
from sslbench_jax.data import label_spaces
from sslbench_jax.data import tfds_source
from sslbench_jax.data import voc_source

_SOURCES = ("auto", "tfds", "folder")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to open one registered dataset.

  Attributes:
    name: registry name.
    description: one line, with sizes.
    splits: canonical split names -> backend split names (aliases allowed as
      extra keys mapping to the same backend split).
    label_space: ``source or None -> LabelSpace`` (some spaces, e.g. iNat
      families, are read from the data).
    preprocessing: the study's evaluation preset for this dataset.
    tfds: ``(split, data_dir) -> Source`` or None.
    folder: ``(split, data_dir) -> Source`` or None.
    detect_folder: ``data_dir -> bool``: does data_dir hold the folder layout.
    prepare: how to obtain the data (shown in docs and errors).
    folder_needs_dir: the folder backend needs ``data_dir``.
    derived_from: registry name of the dataset this one is cut out of, split
      for split (each split is a subset of the parent's split with the same
      backend split, possibly relabelled: ImageNet ReaL is ImageNet-1k
      validation minus the images with an empty ReaL set), or None. Its
      features can be cut out of the parent's (``data.derived``).
  """
  name: str
  description: str
  splits: dict[str, str]
  label_space: Callable[[Any], label_spaces.LabelSpace]
  preprocessing: str = "imagenet_bilinear"
  tfds: Callable[[str, str | None], Any] | None = None
  folder: Callable[[str, str], Any] | None = None
  detect_folder: Callable[[str], bool] | None = None
  prepare: str = ""
  folder_needs_dir: bool = True
  derived_from: str | None = None

  def info(self) -> dict[str, Any]:
    """JSON-serialisable summary (label space without class names)."""
    try:
      ls = self.label_space(None).to_json()
    except Exception:  # pylint: disable=broad-except  (data-dependent spaces)
      ls = None
    return {"name": self.name, "description": self.description,
            "splits": sorted(set(self.splits)), "preprocessing": self.preprocessing,
            "backends": [b for b in ("tfds", "folder") if getattr(self, b)],
            "label_space": ls, "prepare": self.prepare,
            **({"derived_from": self.derived_from} if self.derived_from else {})}


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, overwrite: bool = False) -> None:
  """Adds a dataset (tests and extensions)."""
  if spec.name in _REGISTRY and not overwrite:
    raise ValueError(f"Dataset {spec.name!r} already registered")
  _REGISTRY[spec.name] = spec


def names() -> tuple[str, ...]:
  """All registered dataset names."""
  return tuple(_REGISTRY)


def get_spec(name: str) -> DatasetSpec:
  """The ``DatasetSpec`` of ``name``."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(_REGISTRY)}")
  return _REGISTRY[name]


def open_dataset(name: str, split: str, *, data_dir: str | None = None,
                 preprocessing: dataset_lib.Preprocessing = None, source: str = "auto",
                 on_corrupt: str = "error", seed: int = 0) -> dataset_lib.Dataset:
  """Opens one split of a registered dataset.

  Args:
    name: one of ``names()``.
    split: one of the dataset's splits (see ``get_spec(name).splits``).
    data_dir: TFDS data dir, or the root of the folder layout.
    preprocessing: preset name, callable, ``TrainAugment``, or None for the
      dataset's default (the study's preset).
    source: "auto", "tfds" or "folder".
    on_corrupt: "error" or "skip" (see ``Dataset``).
    seed: augmentation seed for a ``TrainAugment``.

  Returns:
    A ``Dataset``.
  """
  spec = get_spec(name)
  if split not in spec.splits:
    raise ValueError(f"Unknown split {split!r} for {name}; known: "
                     f"{', '.join(sorted(spec.splits))}")
  if source not in _SOURCES:
    raise ValueError(f"Unknown source {source!r}; known: {', '.join(_SOURCES)}")
  backend_split = spec.splits[split]
  if source == "auto":
    use_folder = spec.folder is not None and (
        spec.tfds is None or (data_dir is not None and spec.detect_folder is not None
                              and spec.detect_folder(data_dir)))
    source = "folder" if use_folder else "tfds"
  if source == "folder":
    if spec.folder is None:
      raise ValueError(f"{name} has no folder backend; use source='tfds'")
    if data_dir is None and spec.folder_needs_dir:
      raise ValueError(f"{name}: pass data_dir= (the dataset's folder). {spec.prepare}")
    src = spec.folder(backend_split, data_dir)
  else:
    if spec.tfds is None:
      raise ValueError(f"{name} has no TFDS backend; use source='folder'")
    src = spec.tfds(backend_split, data_dir)
  return dataset_lib.Dataset(src, spec.label_space(src), name=name, split=split,
                             preprocessing=preprocessing,
                             default_preprocessing=spec.preprocessing,
                             on_corrupt=on_corrupt, seed=seed)


# ---------------------------------------------------------------------------
# Helpers for the entries.


@functools.cache
def _tfds_code_class_names(tfds_name: str) -> tuple[str, ...]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tuple(tfds.builder(tfds_name).info.features["label"].names)


def _tfds_space(name, tfds_name):
  """Class names from the prepared data (CIFAR/CUB store them there), else code."""
  def space(src):
    names = src.class_names() if isinstance(src, tfds_source.TfdsSource) else None
    return label_spaces.simple(name, names or _tfds_code_class_names(tfds_name))
  return space


def _tfds(tfds_name, id_key=None, label_fn=None, hint=""):
  def make(split, data_dir):
    return tfds_source.TfdsSource(tfds_name, split, data_dir, id_key=id_key,
                                  label_fn=label_fn, prepare_hint=hint)
  return make


def _has(*parts):
  return lambda d: os.path.isdir(os.path.join(d, *parts))


_VAL_RE = re.compile(r"ILSVRC2012_val_(\d{8})")


@functools.cache
def _val_file_labels() -> dict[str, int]:
  from importlib import resources  # pylint: disable=g-import-not-at-top
  return json.loads(resources.files("sslbench_jax.data").joinpath(
      "meta", "val_image_to_1k_label.json").read_text())


def _imagenet_split_folder(split, data_dir):
  """``<data_dir>/<split>/<wnid>/*`` (torchvision ImageNet) or a flat val folder."""
  root = os.path.join(data_dir, split)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"ImageNet folder {root} not found (expected "
                            f"{data_dir}/{{train,val}}/<wnid>/*.JPEG)")
  if any(e.is_dir() for e in os.scandir(root)):
    return folder_source.FolderSource(root, classes=label_spaces.imagenet_wnids())
  labels = _val_file_labels()
  files = sorted(f for f in os.listdir(root) if f in labels)
  if not files:
    raise FileNotFoundError(f"{root}: neither <wnid>/ sub-folders nor "
                            f"ILSVRC2012_val_*.JPEG files")
  return folder_source.ListSource([(os.path.join(root, f), labels[f], f) for f in files])


def _real_subset(src, ids):
  """Keeps val images with a non-empty ReaL set; labels become multi-hot."""
  real = label_spaces.real_labels()
  keep, sets = [], {}
  for i, example_id in enumerate(ids):
    m = _VAL_RE.search(example_id)
    if m is None:
      raise ValueError(f"ReaL needs ImageNet val file names, got {example_id!r}")
    labels = real[int(m.group(1)) - 1]
    if labels:
      keep.append(i)
      sets[i] = labels
  return dataset_lib.SubsetSource(
      src, keep, label_fn=lambda i, _, __: label_spaces.multi_hot(sets[i], 1000))


def _real_tfds(split, data_dir):
  src = tfds_source.TfdsSource("imagenet2012", split, data_dir, id_key="file_name",
                               prepare_hint=_IMAGENET_HINT)
  return _real_subset(src, src.ids())


def _real_folder(split, data_dir):
  src = _imagenet_split_folder(split, data_dir)
  return _real_subset(src, [src.read(i)[2] for i in range(len(src))])


def _wnid_folder(split, data_dir):
  del split
  return folder_source.FolderSource(data_dir, classes=label_spaces.imagenet_wnids())


def _v2_folder(split, data_dir):
  del split
  return folder_source.FolderSource(data_dir, class_to_index={str(i): i for i in range(1000)})


def _is_wnid_folder(d):
  return os.path.isdir(d) and any(re.fullmatch(r"n\d{8}", e.name) and e.is_dir()
                                  for e in os.scandir(d))


def _is_v2_folder(d):
  return os.path.isdir(os.path.join(d, "0")) and os.path.isdir(os.path.join(d, "999"))


def _voc(split, data_dir):
  return voc_source.VocSegmentationSource(data_dir, split)


def _inat(split, data_dir):
  return inaturalist_source.INaturalist2021Source(data_dir, split, "family")


def _inat_space(src):
  if src is None:
    return label_spaces.simple("inat2021_family",
                               [f"family_{i}" for i in range(1103)])
  return label_spaces.simple("inat2021_family", src.classes)


def _wnid_prefixed_files(split, data_dir):
  """A flat folder of ``<wnid>_<anything>.<ext>`` (the ../shared ImageNet samples)."""
  del split
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"image folder not found: {data_dir}")
  index = {w: i for i, w in enumerate(label_spaces.imagenet_wnids())}
  samples = []
  for name in sorted(os.listdir(data_dir)):
    if not folder_source.is_image_file(name):
      continue
    wnid = name.split("_", 1)[0]
    if wnid not in index:
      raise ValueError(f"{os.path.join(data_dir, name)}: file name does not start with "
                       "an ImageNet wnid (<wnid>_...)")
    samples.append((os.path.join(data_dir, name), index[wnid], name))
  if not samples:
    raise FileNotFoundError(f"no images in {data_dir}")
  return folder_source.ListSource(samples)


# "Restricted ImageNet" (Tsipras et al. 2019, https://arxiv.org/abs/1805.12152):
# 9 superclasses as inclusive ranges of ImageNet-1k class indices.
RESTRICTED_IMAGENET: tuple[tuple[str, int, int], ...] = (
    ("dog", 151, 268), ("cat", 281, 285), ("frog", 30, 32), ("turtle", 33, 37),
    ("bird", 80, 100), ("primate", 365, 382), ("fish", 389, 397), ("crab", 118, 121),
    ("insect", 300, 319))


def _restricted_samples(split, data_dir):
  """The images of ``_wnid_prefixed_files`` in a Restricted ImageNet superclass.

  Labels are the superclass (0..8). A fixed split without randomness: within
  each superclass, in file-name (= class index) order, images 0, 2, 4, ... are
  ``train`` and 1, 3, 5, ... are ``test`` (on ../shared's one image per
  class: 104 train / 99 test).
  """
  coarse = {i: c for c, (_, lo, hi) in enumerate(RESTRICTED_IMAGENET)
            for i in range(lo, hi + 1)}
  seen = [0] * len(RESTRICTED_IMAGENET)
  samples = []
  for path, label, example_id in _wnid_prefixed_files(split, data_dir).samples:
    if label not in coarse:
      continue
    c = coarse[label]
    if seen[c] % 2 == (0 if split == "train" else 1):
      samples.append((path, c, example_id))
    seen[c] += 1
  if not samples:
    raise FileNotFoundError(f"no Restricted ImageNet images ({split}) in {data_dir}")
  return folder_source.ListSource(samples)


def _csv(split, data_dir):
  path = data_dir if data_dir.endswith(".csv") else os.path.join(data_dir, f"{split}.csv")
  return folder_source.CsvSource(path)


def _generic_folder(split, data_dir):
  root = os.path.join(data_dir, split)
  return folder_source.FolderSource(root if os.path.isdir(root) else data_dir)


def _from_source(name):
  def space(src):
    if src is None:
      raise ValueError(f"{name}: classes come from the data")
    return label_spaces.simple(name, src.classes)
  return space


_IMAGENET_HINT = ("Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
                  "https://image-net.org/download-images) in <data_dir>/downloads/manual.")
_TFDS_AUTO = "TFDS downloads it during `tfds build` (internet needed once)."
_IN = label_spaces.imagenet

# ---------------------------------------------------------------------------
# The entries.

register(DatasetSpec(
    "imagenet1k", "ImageNet-1k (ILSVRC2012): train 1,281,167 / val 50,000, 1000 classes",
    {"train": "train", "validation": "validation", "val": "validation"},
    lambda src: _IN(), "imagenet_bilinear",
    tfds=_tfds("imagenet2012", "file_name", hint=_IMAGENET_HINT),
    folder=lambda split, d: _imagenet_split_folder("val" if split == "validation" else split, d),
    detect_folder=lambda d: _has("val")(d) or _has("train")(d),
    prepare=_IMAGENET_HINT + " Folder alternative: <data_dir>/{train,val}/<wnid>/*.JPEG."))

register(DatasetSpec(
    "imagenet_real", "ImageNet ReaL: val images with a non-empty ReaL set (46,837), multi-label",
    {"validation": "validation", "val": "validation"},
    lambda src: label_spaces.imagenet_real(), "imagenet_bilinear",
    tfds=_real_tfds,
    folder=lambda split, d: _real_folder("val", d),
    detect_folder=_has("val"),
    prepare="Uses ImageNet-1k val (imagenet2012 in TFDS or <data_dir>/val/) and the "
            "shipped ReaL labels. " + _IMAGENET_HINT,
    derived_from="imagenet1k"))

for _suffix, _config, _desc in (("", "matched-frequency", "MatchedFrequency"),
                                ("_threshold", "threshold-0.7", "Threshold0.7"),
                                ("_top", "topimages", "TopImages")):
  register(DatasetSpec(
      f"imagenet_v2{_suffix}", f"ImageNetV2 {_desc}: 10,000 test images, 1000 classes",
      {"test": "test"}, lambda src: _IN(), "imagenet_bilinear",
      tfds=_tfds(f"imagenet_v2/{_config}", "file_name"),
      folder=_v2_folder, detect_folder=_is_v2_folder,
      prepare=f"{_TFDS_AUTO} Folder alternative: the extracted "
              f"imagenetv2-{_config}.tar.gz (class folders 0..999)."))

for _name, _indices, _desc in (
    ("imagenet_r", label_spaces.imagenet_r_indices,
     "ImageNet-R: 30,000 renditions of 200 classes"),
    ("imagenet_a", label_spaces.imagenet_a_indices,
     "ImageNet-A: 7,500 natural adversarial images of 200 classes")):
  register(DatasetSpec(
      _name, _desc + " (logits restricted to the 200; unrestricted top-1 also reported)",
      {"test": "test"},
      (lambda n, ind: lambda src: label_spaces.imagenet_subset(n, ind()))(_name, _indices),
      "imagenet_bilinear", tfds=_tfds(_name, "file_name"),
      folder=_wnid_folder, detect_folder=_is_wnid_folder,
      prepare=f"{_TFDS_AUTO} Folder alternative: the extracted tar (<wnid>/ folders)."))

register(DatasetSpec(
    "imagenet_sketch", "ImageNet-Sketch: 50,889 sketches, 1000 classes",
    {"test": "test"}, lambda src: _IN(), "imagenet_bilinear",
    tfds=_tfds("imagenet_sketch", "file_name"),
    folder=_wnid_folder, detect_folder=_is_wnid_folder,
    prepare=f"{_TFDS_AUTO} Folder alternative: the extracted sketch/ (<wnid>/ folders)."))

register(DatasetSpec(
    "inat2021_mini_family",
    "iNaturalist 2021 mini at family level: train_mini 500,000 / val 100,000, 1,103 classes",
    {"train": "train_mini", "train_mini": "train_mini", "val": "val", "validation": "val"},
    lambda src: _inat_space(src), "imagenet_bilinear", folder=_inat,
    prepare="Download train_mini.tar.gz and val.tar.gz from "
            "https://github.com/visipedia/inat_comp/tree/master/2021 and extract them "
            "into data_dir."))

register(DatasetSpec(
    "cub200", "CUB-200-2011: train 5,994 / test 5,794, 200 classes (pad to square)",
    {"train": "train", "test": "test"},
    _tfds_space("cub200", "caltech_birds2011"),
    "pad_square", tfds=_tfds("caltech_birds2011", "image/filename"), prepare=_TFDS_AUTO))

register(DatasetSpec(
    "voc2012",
    "Pascal VOC 2012 segmentation, majority object class: train 1,464 / val 1,449, 21 outputs",
    {"train": "train", "val": "val", "validation": "val"},
    lambda src: label_spaces.simple("voc2012", label_spaces.VOC_CLASSES), "crop_square",
    folder=_voc, prepare=voc_source._DOWNLOAD))  # pylint: disable=protected-access

register(DatasetSpec(
    "cifar100", "CIFAR-100: train 50,000 / test 10,000, 100 classes (32x32 -> 256 -> 224)",
    {"train": "train", "test": "test"},
    _tfds_space("cifar100", "cifar100"),
    "pad_square", tfds=_tfds("cifar100", "id"), prepare=_TFDS_AUTO))

for _domain in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"):
  register(DatasetSpec(
      f"domainnet_{_domain}", f"DomainNet {_domain} (345 classes; the study's ImageNet-D {_domain})",
      {"train": "train", "test": "test"},
      _tfds_space(f"domainnet_{_domain}", f"domainnet/{_domain}"),
      "imagenet_bilinear", tfds=_tfds(f"domainnet/{_domain}"), prepare=_TFDS_AUTO))

register(DatasetSpec(
    "fashion_mnist", "Fashion-MNIST: train 60,000 / test 10,000 28x28 grayscale, 10 classes",
    {"train": "train", "test": "test"},
    lambda src: label_spaces.simple("fashion_mnist", label_spaces.FASHION_MNIST_CLASSES),
    "imagenet_bilinear",
    folder=lambda split, d: array_source.fashion_mnist(split, d), folder_needs_dir=False,
    prepare="apt-get install dataset-fashion-mnist (files in "
            f"{array_source.FASHION_MNIST_DIR}), or pass data_dir= with the IDX files."))

# The demo's Fashion-MNIST: a prefix of each split (the files are not sorted
# by class), so that 6 backbones x 3 datasets fit its time budget.
FASHION_MNIST_SMALL = {"train": 5000, "test": 1000}


def _fashion_mnist_small(split, data_dir):
  src = array_source.fashion_mnist(split, data_dir)
  n = FASHION_MNIST_SMALL[split]
  return array_source.ArraySource(src.images[:n], src.labels[:n], split)


register(DatasetSpec(
    "fashion_mnist_small",
    "Fashion-MNIST, first 5,000 train / first 1,000 test images (the demo's subset)",
    {"train": "train", "test": "test"},
    lambda src: label_spaces.simple("fashion_mnist_small", label_spaces.FASHION_MNIST_CLASSES),
    "imagenet_bilinear", folder=_fashion_mnist_small, folder_needs_dir=False,
    prepare="apt-get install dataset-fashion-mnist (files in "
            f"{array_source.FASHION_MNIST_DIR}), or pass data_dir= with the IDX files."))

register(DatasetSpec(
    "digits", "scikit-learn digits: 1,797 8x8 images (train 1,437 / test 360), 10 classes",
    {"train": "train", "test": "test"},
    lambda src: label_spaces.simple("digits", range(10)), "imagenet_bilinear",
    folder=lambda split, d: array_source.digits(split), folder_needs_dir=False,
    prepare="Ships with scikit-learn."))

register(DatasetSpec(
    "imagenet_samples",
    "Flat folder of ImageNet images named <wnid>_*.JPEG (e.g. ../shared's 1000, one per class)",
    {"test": "test"}, lambda src: _IN(), "imagenet_bilinear",
    folder=_wnid_prefixed_files,
    prepare="Pass data_dir= the folder (e.g. shared/data/imagenet_samples)."))

register(DatasetSpec(
    "imagenet_samples_restricted",
    "The imagenet_samples folder at the 9 Restricted ImageNet superclasses (Tsipras et al. "
    "2019): alternate images per superclass train / test (../shared: 104 / 99)",
    {"train": "train", "test": "test"},
    lambda src: label_spaces.simple("imagenet_samples_restricted",
                                    [c for c, _, _ in RESTRICTED_IMAGENET]),
    "imagenet_bilinear", folder=_restricted_samples,
    prepare="Pass data_dir= the folder (e.g. shared/data/imagenet_samples)."))

register(DatasetSpec(
    "folder", "Generic image folder: <data_dir>/<split>/<class>/* (or <data_dir>/<class>/*)",
    {"train": "train", "val": "val", "test": "test"}, _from_source("folder"),
    "imagenet_bilinear", folder=_generic_folder))

register(DatasetSpec(
    "csv", "Generic CSV of path,label: <data_dir>/<split>.csv or data_dir=<file>.csv",
    {"train": "train", "val": "val", "test": "test"}, _from_source("csv"),
    "imagenet_bilinear", folder=_csv))

DATASETS: tuple[str, ...] = names()
