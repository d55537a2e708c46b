"""Label spaces: class lists, multi-label flags, class subsets and metric names.

The ImageNet metadata ships with the package (``sslbench_jax/data/meta``):
sorted wnids (class index order), class names, ReaL labels, and the 200-class
subsets of ImageNet-R and ImageNet-A as indices into the 1000 classes.

Metric names (``METRICS``, defined and implemented in ``sslbench_jax.metrics``):
  * ``top1``: argmax over all logits equals the label.
  * ``real_top1``: argmax is in the example's ReaL label set (multi-hot);
    examples with an empty set are not part of the dataset (46,837 remain).
  * ``subset_top1``: logits restricted to ``subset`` before the argmax (the
    ImageNet-R / ImageNet-A protocol); ``top1`` is reported alongside.
  * ``mean_per_class``: mean over classes of per-class accuracy.

``LabelSpace.to_json`` is what extraction records in every feature file
(``meta["source"]["label_space"]``, class subset included), so that scoring
(``metrics.scoring``) reads the label space from the file alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources

import numpy as np

from sslbench_jax.metrics import label_space as scoring_space

METRICS = scoring_space.METRICS


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """What a dataset's labels mean and how predictions are scored.

  Attributes:
    name: short identifier.
    num_classes: size of the label (logit) space.
    class_names: ``num_classes`` human-readable names.
    multi_label: labels are multi-hot ``(num_classes,)`` int8 vectors.
    subset: sorted class indices the dataset covers (R/A: 200 of 1000), or None.
    metrics: metric names, the primary one first (see ``METRICS``; the
      primary metric is ``metrics.primary.primary_metric``'s choice).
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  multi_label: bool = False
  subset: tuple[int, ...] | None = None
  metrics: tuple[str, ...] = ("top1",)

  def __post_init__(self):
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"{self.name}: {len(self.class_names)} names for "
                       f"{self.num_classes} classes")
    unknown = set(self.metrics) - set(METRICS)
    if unknown:
      raise ValueError(f"Unknown metric(s) {sorted(unknown)}; known: {METRICS}")

  @property
  def metric(self) -> str:
    """The primary metric (``metrics.primary``: real_top1, subset_top1, else top1)."""
    return self.for_scoring().primary

  def predict(self, logits: np.ndarray) -> np.ndarray:
    """Class predictions in the full label space under the primary metric.

    With a ``subset`` and ``subset_top1``, the argmax runs over the subset's
    logits only and is mapped back to full-space indices.

    Args:
      logits: ``(N, num_classes)`` scores.

    Returns:
      ``(N,)`` int64 class indices.
    """
    logits = np.asarray(logits)
    if self.subset is not None and self.metric == "subset_top1":
      sub = np.asarray(self.subset)
      return sub[np.argmax(logits[:, sub], axis=1)]
    return np.argmax(logits, axis=1)

  def for_scoring(self) -> scoring_space.LabelSpace:
    """What scoring needs of this space (``metrics.label_space.LabelSpace``)."""
    return scoring_space.LabelSpace(
        self.name, self.num_classes, tuple(self.metrics), self.multi_label,
        None if self.subset is None else tuple(int(i) for i in self.subset))

  def to_json(self) -> dict:
    """Provenance summary (class names omitted; the class subset included).

    Feature files record it as ``meta["source"]["label_space"]``.
    """
    return self.for_scoring().to_json()


def _meta_text(name: str) -> str:
  return resources.files("sslbench_jax.data").joinpath("meta", name).read_text()


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
  """The 1000 ImageNet-1k wnids in class index order (sorted)."""
  return tuple(_meta_text("imagenet_synsets.txt").split())


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
  """Readable names of the 1000 classes, in class index order."""
  return tuple(json.loads(_meta_text("imagenet1k_clean_names.json")))


@functools.cache
def real_labels() -> tuple[tuple[int, ...], ...]:
  """ReaL label sets of the 50,000 val images, by val image number - 1."""
  return tuple(tuple(x) for x in json.loads(_meta_text("imagenet_real_labels.json")))


@functools.cache
def imagenet_r_indices() -> tuple[int, ...]:
  """Indices of the 200 ImageNet-R classes in the 1000-class space."""
  return tuple(int(x) for x in _meta_text("imagenet_r_indices.txt").split())


@functools.cache
def imagenet_a_indices() -> tuple[int, ...]:
  """Indices of the 200 ImageNet-A classes in the 1000-class space."""
  return tuple(int(x) for x in _meta_text("imagenet_a_indices.txt").split())


def multi_hot(labels: tuple[int, ...], num_classes: int) -> np.ndarray:
  """``(num_classes,)`` int8 vector with ones at ``labels``."""
  v = np.zeros(num_classes, np.int8)
  v[list(labels)] = 1
  return v


def imagenet() -> LabelSpace:
  return LabelSpace("imagenet1k", 1000, imagenet_class_names())


def imagenet_real() -> LabelSpace:
  return LabelSpace("imagenet_real", 1000, imagenet_class_names(), multi_label=True,
                    metrics=("real_top1",))


def imagenet_subset(name: str, indices: tuple[int, ...]) -> LabelSpace:
  """A 200-class ImageNet subset scored with restricted logits (and unrestricted)."""
  return LabelSpace(name, 1000, imagenet_class_names(), subset=tuple(indices),
                    metrics=("subset_top1", "top1"))


def simple(name: str, class_names, metrics=("top1",)) -> LabelSpace:
  """A single-label space over ``class_names``."""
  names = tuple(str(c) for c in class_names)
  return LabelSpace(name, len(names), names, metrics=tuple(metrics))


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus",
               "car", "cat", "chair", "cow", "diningtable", "dog", "horse",
               "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
