"""What a feature file's labels mean, as recorded in its metadata.

Extraction writes the test set's label space into every feature file
(``meta["source"]["label_space"]``, from the data layer's
``data.label_spaces.LabelSpace.to_json``)::

  {"name": "imagenet_r", "num_classes": 1000, "multi_label": false,
   "metrics": ["subset_top1", "top1"], "subset_size": 200,
   "subset": [1, 2, 4, ...]}      # "subset" only for a class-subset space

so that scoring a file needs no dataset registry: ``read_label_space`` reads
it from the file. Files written before the class subset was recorded (or
without any label space) are read by ``legacy_label_space``, the one place
that falls back to the dataset registry through the file's dataset name.

No jax import (the data layer builds its JSON with ``LabelSpace``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from sslbench_jax.metrics import primary as primary_lib

# Metric names a label space may list (implemented in ``metrics.scoring``):
#   top1: argmax over all scores equals the label;
#   real_top1: argmax is in the example's ReaL label set (multi-hot);
#     examples with an empty set are not scored;
#   subset_top1: scores restricted to the class subset before the argmax
#     (ImageNet-R / -A); top1 is reported alongside;
#   mean_per_class: mean over the classes present of per-class top-1.
METRICS: tuple[str, ...] = ("top1", "real_top1", "subset_top1", "mean_per_class")


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """A label space as scoring sees it (no class names).

  Attributes:
    name: label space name (e.g. ``"imagenet_r"``), or the dataset name.
    num_classes: size of the score space, or None when the file does not say.
    metrics: metrics the space lists (``METRICS``); scoring adds top1/top5
      for single-label spaces.
    multi_label: labels are (N, C) multi-hot (ImageNet ReaL).
    subset: class indices of a class-subset space (ImageNet-R / -A: 200 of
      1000) in the order the dataset lists them; None otherwise, or for a
      legacy file whose subset could not be found (``subset_size`` then
      still says how large it is).
    subset_size: number of subset classes (None without a subset).
  """
  name: str | None
  num_classes: int | None
  metrics: tuple[str, ...] = ("top1",)
  multi_label: bool = False
  subset: tuple[int, ...] | None = None
  subset_size: int | None = None

  def __post_init__(self):
    if not self.metrics:
      raise ValueError(f"label space {self.name!r} lists no metric")
    unknown = sorted(set(self.metrics) - set(METRICS))
    if unknown:
      raise ValueError(f"label space {self.name!r} lists unknown metric(s) "
                       f"{unknown}; known: {list(METRICS)}")
    if self.subset is not None:
      if self.subset_size is None:
        object.__setattr__(self, "subset_size", len(self.subset))
      elif self.subset_size != len(self.subset):
        raise ValueError(f"label space {self.name!r}: subset_size "
                         f"{self.subset_size} but {len(self.subset)} subset classes")
      if len(set(self.subset)) != len(self.subset) or min(self.subset, default=0) < 0 or (
          self.num_classes is not None and max(self.subset, default=-1) >= self.num_classes):
        raise ValueError(f"label space {self.name!r}: the subset must be distinct "
                         f"class indices in [0, {self.num_classes})")

  @property
  def reported_metrics(self) -> tuple[str, ...]:
    """What scoring reports (top-5 aside): the listed metrics, then top1 if single-label."""
    if self.multi_label:
      return self.metrics
    return self.metrics + tuple(m for m in ("top1",) if m not in self.metrics)

  @property
  def primary(self) -> str | None:
    """The primary metric (``metrics.primary.primary_metric`` of what is reported)."""
    return primary_lib.primary_metric(self.reported_metrics)

  @property
  def needs_subset(self) -> bool:
    """Scored by subset_top1 but the class subset is unknown (a legacy file)."""
    return "subset_top1" in self.metrics and self.subset is None

  def to_json(self) -> dict[str, Any]:
    """The dict extraction records in ``meta["source"]["label_space"]``."""
    out = {"name": self.name, "num_classes": self.num_classes,
           "multi_label": self.multi_label, "subset_size": self.subset_size,
           "metrics": list(self.metrics)}
    if self.subset is not None:  # absent otherwise: other files' meta unchanged
      out["subset"] = [int(i) for i in self.subset]
    return out

  @classmethod
  def from_json(cls, d: Any, where: str, default_name: str | None = None) -> "LabelSpace":
    """Parses a recorded label space (untrusted file data).

    Args:
      d: the recorded dict.
      where: the file, for errors.
      default_name: name used when the dict has none (the dataset name).

    Returns:
      The ``LabelSpace``.

    Raises:
      ValueError: one line naming ``where``: not a dict, no or unknown
        metrics, non-integer sizes or subset.
    """
    if not isinstance(d, Mapping) or "metrics" not in d:
      raise ValueError(f"{where}: malformed label space in its meta: {d!r}")
    try:
      if isinstance(d["metrics"], (str, bytes)):
        raise TypeError("metrics must be a list")
      metrics = tuple(str(m) for m in d["metrics"])
      n = d.get("num_classes")
      size = d.get("subset_size")
      subset = d.get("subset")
      return cls(name=str(d.get("name") or default_name) if (d.get("name") or default_name)
                 else None,
                 num_classes=None if n is None else _int(n),
                 metrics=metrics, multi_label=bool(d.get("multi_label")),
                 subset=None if subset is None else tuple(_int(i) for i in subset),
                 subset_size=None if size is None else _int(size))
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: label space {d.get('name')!r} in its meta: "
                       f"{e}") from None


def _int(v: Any) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
    raise ValueError(f"{v!r} is not an integer")
  return int(v)


def dataset_name(meta: Mapping[str, Any]) -> str | None:
  """The dataset a feature file was made from (``meta["source"]`` first)."""
  source = meta.get("source") if isinstance(meta.get("source"), Mapping) else {}
  name = source.get("dataset") or meta.get("dataset")
  return str(name) if name else None


def recorded_json(meta: Mapping[str, Any]) -> Any:
  """The label-space dict a feature file records, or None."""
  source = meta.get("source") if isinstance(meta.get("source"), Mapping) else {}
  return source.get("label_space")


def read_label_space(meta: Mapping[str, Any], path: str) -> LabelSpace | None:
  """The label space a feature file records.

  Args:
    meta: the feature file's meta.
    path: the file, for errors.

  Returns:
    The recorded ``LabelSpace``; for files that predate a complete record
    (no label space, or a subset space without its classes), what
    ``legacy_label_space`` finds; None when nothing says (a hand-made file:
    plain single-label scoring).

  Raises:
    ValueError: a malformed recorded space (one line naming ``path``).
  """
  recorded = recorded_json(meta)
  if recorded is not None:
    space = LabelSpace.from_json(recorded, path, dataset_name(meta))
    if not space.needs_subset:
      return space
  return legacy_label_space(meta, path)


def legacy_label_space(meta: Mapping[str, Any], path: str) -> LabelSpace | None:
  """COMPATIBILITY: a label space for files written before it was self-describing.

  Feature files written before the class subset travelled in the metadata
  record ImageNet-R / -A's space without its classes (only ``subset_size``),
  and hand-made files may record no space at all. Both are completed from
  the dataset registry by the file's dataset name (then by the space's
  name), exactly as scoring did before, so that existing caches and results
  stay valid. New files never need this.

  Args:
    meta: the feature file's meta.
    path: the file, for errors.

  Returns:
    The recorded space (or the registry's space of ``meta``'s dataset),
    with the subset filled in when a registered dataset gives it (else left
    None: ``scoring.resolve`` refuses to score subset_top1 without it); None
    when neither the file nor the registry says anything.

  Raises:
    ValueError: malformed space, or a recorded ``subset_size`` that differs
      from the registry's subset.
  """
  from sslbench_jax.data import registry  # pylint: disable=g-import-not-at-top
  dataset = dataset_name(meta)
  recorded = recorded_json(meta)
  if recorded is None and dataset is not None and dataset in registry.names():
    recorded = registry.get_spec(dataset).info()["label_space"]
  if recorded is None:
    return None
  space = LabelSpace.from_json(recorded, path, dataset)
  if not space.needs_subset:
    return space
  for key in dict.fromkeys(k for k in (dataset, space.name) if k):
    if key not in registry.names():
      continue
    try:
      subset = registry.get_spec(key).label_space(None).subset
    except Exception:  # pylint: disable=broad-except  (data-dependent spaces)
      subset = None
    if subset is None:
      continue
    if space.subset_size is not None and space.subset_size != len(subset):
      raise ValueError(f"{path}: label space {space.name!r} records a "
                       f"{space.subset_size}-class subset but the registry's "
                       f"{key!r} has {len(subset)} classes")
    return dataclasses.replace(space, subset=tuple(int(i) for i in subset),
                               subset_size=len(subset))
  return space
