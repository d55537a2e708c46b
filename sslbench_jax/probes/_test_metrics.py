"""A probe's test-set metrics: top-1/top-5 plus the test label space's own.

Every probe ends with (N_test, C) class scores; ``evaluate`` turns them into
``{metric: %}`` for the test file, the same way for every protocol:

* ``top1`` / ``top5`` for single-label test sets;
* the metrics the test set's label space lists (``data/label_spaces.py``):
  ``real_top1`` (ImageNet-ReaL: multi-hot labels, images with an empty set
  excluded), ``subset_top1`` (ImageNet-R / -A: scores restricted to the
  200-class subset before the argmax), ``mean_per_class``.

The label space comes from the feature file's provenance: ``features`` writes
``meta["source"]`` = the dataset's ``describe()``, whose ``label_space`` holds
the name, size, multi-label flag and metrics (not the subset's class indices,
which are read from the dataset registry by ``meta["dataset"]``). Files without
it (hand-made, ``--images`` folders) fall back to the registry entry of
``meta["dataset"]``, else to a plain single-label space scored by top-1/top-5.

The metric arithmetic is ``sslbench_jax.metrics.accuracy``'s, over padded,
masked chunks of a fixed shape (one compilation per metric and shape).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np

from sslbench_jax.data import label_spaces
from sslbench_jax.metrics import accuracy
from sslbench_jax.metrics.accumulator import MetricAccumulator

# (scores (N, C), labels (N,), k) -> (N,) bool: label among the k best.
TopkCorrect = Callable[[np.ndarray, np.ndarray, int], np.ndarray]

_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class EvalSpace:
  """A test file's labels in the scores' class space, and what to report.

  Attributes:
    path: the test file (for errors).
    name: label space name, or None when the file records none.
    num_classes: size of the label (score) space, or None when unknown.
    metrics: the label space's metrics, primary first (``label_spaces.METRICS``).
    subset: class indices the scores are restricted to for ``subset_top1``.
    labels: (N,) int64 class indices in the full space, or (N, C) bool
      multi-hot (ReaL).
  """
  path: str
  name: str | None
  num_classes: int | None
  metrics: tuple[str, ...]
  subset: tuple[int, ...] | None
  labels: np.ndarray

  @property
  def multi_label(self) -> bool:
    return self.labels.ndim == 2

  @property
  def single_labels(self) -> np.ndarray | None:
    """(N,) class indices, or None for a multi-label test set."""
    return None if self.multi_label else self.labels

  def metric_names(self, top5: bool = True) -> tuple[str, ...]:
    """Names ``evaluate`` returns: the space's metrics, then top1 (and top5)."""
    names = list(self.metrics)
    if not self.multi_label:
      names += [m for m in ("top1", "top5")[:2 if top5 else 1] if m not in names]
    return tuple(names)


def resolve(fs: Any, path: str) -> EvalSpace:
  """Reads a test ``FeatureSet``'s label space and normalises its labels.

  Args:
    fs: a ``features.io.FeatureSet``.
    path: its file name, for errors.

  Returns:
    An ``EvalSpace``; subset (ImageNet-R / -A) labels stored as positions
    0..S-1 into the subset are mapped to the full class space.

  Raises:
    ValueError: unknown metric names or label space, labels that do not fit
      the label space, unknown (-1) labels, no examples.
  """
  space, dataset = recorded_space(fs.meta, path)
  y = np.asarray(fs.labels)
  if len(y) == 0:
    raise ValueError(f"{path}: no examples")
  if space is None:
    if y.ndim != 1:
      raise ValueError(f"{path}: multi-hot (N, C) labels but no label space in its "
                       "meta (meta['source']['label_space'] or a registered "
                       "meta['dataset']); cannot tell how to score them")
    return EvalSpace(path, None, None, ("top1",), None, _single(y, path))
  name, num_classes = space["name"], space["num_classes"]
  metrics, multi = space["metrics"], space["multi_label"]
  if multi or y.ndim == 2:
    if not (multi and y.ndim == 2 and metrics == ("real_top1",)):
      raise ValueError(
          f"{path}: labels of shape {y.shape} do not fit label space {name!r} "
          f"(multi_label={multi}, metrics={list(metrics)}); multi-hot (N, C) "
          "labels are scored by real_top1 only")
    if num_classes is not None and y.shape[1] != num_classes:
      raise ValueError(f"{path}: multi-hot labels have {y.shape[1]} columns but "
                       f"label space {name!r} has {num_classes} classes")
    if not np.isin(y, (0, 1)).all():
      raise ValueError(f"{path}: multi-hot labels must be 0/1")
    return EvalSpace(path, name, num_classes, metrics, None, y.astype(bool))
  y = _single(y, path)
  subset = None
  if "subset_top1" in metrics:
    subset = _subset_indices(dataset, name, space, path)
    y = _subset_labels_to_full(y, subset, name, path)
  return EvalSpace(path, name, num_classes, metrics, subset, y)


def recorded_space(meta: Mapping[str, Any],
                   path: str) -> tuple[dict[str, Any] | None, str | None]:
  """The label space a feature file records, and its dataset name.

  Args:
    meta: the ``FeatureSet``'s meta.
    path: its file name, for errors.

  Returns:
    (``{"name", "num_classes", "multi_label", "metrics"}`` or None, dataset
    name or None). ``meta["source"]["label_space"]`` first (what ``features``
    writes), else the registry entry of ``meta["dataset"]``.

  Raises:
    ValueError: a recorded space that names unknown metrics or is malformed.
  """
  source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
  dataset = source.get("dataset") or meta.get("dataset")
  dataset = str(dataset) if dataset else None
  space = source.get("label_space")
  if space is None and dataset is not None:
    space = _registry_space_json(dataset)
  if space is None:
    return None, dataset
  if not isinstance(space, dict) or "metrics" not in space:
    raise ValueError(f"{path}: malformed label space in its meta: {space!r}")
  metrics = tuple(str(m) for m in space["metrics"])
  unknown = sorted(set(metrics) - set(label_spaces.METRICS))
  if unknown or not metrics:
    raise ValueError(f"{path}: label space {space.get('name')!r} lists unknown "
                     f"metric(s) {unknown or metrics}; known: "
                     f"{list(label_spaces.METRICS)}")
  n = space.get("num_classes")
  return dict(name=str(space.get("name") or dataset), metrics=metrics,
              num_classes=None if n is None else int(n),
              multi_label=bool(space.get("multi_label")),
              subset_size=space.get("subset_size")), dataset


def evaluate(scores: np.ndarray,
             test: Any,
             path: str = "test features",
             *,
             top5: bool = True,
             topk_correct: TopkCorrect | None = None) -> dict[str, float]:
  """A probe's test metrics, in percent.

  Args:
    scores: (N_test, C) class scores or logits of the probe, C the training
      label space's size.
    test: the test ``FeatureSet`` (or its ``resolve``d ``EvalSpace``).
    path: the test file, for errors.
    top5: also report top-5 (single-label test sets).
    topk_correct: replaces the top-5 ranking (kNN: a class without votes
      never counts, ``knn.topk_correct``); top-1 and the others use the
      ranking of ``metrics.accuracy`` (ties: lower class index).

  Returns:
    ``{name: %}`` in the order of ``EvalSpace.metric_names(top5)``.

  Raises:
    ValueError: scores whose shape does not fit the test labels.
  """
  space = test if isinstance(test, EvalSpace) else resolve(test, path)
  scores = np.asarray(scores)
  n = len(space.labels)
  if scores.ndim != 2 or len(scores) != n:
    raise ValueError(f"{space.path}: scores of shape {scores.shape} for {n} test "
                     "examples")
  c = scores.shape[1]
  if space.num_classes is not None and c != space.num_classes:
    raise ValueError(f"{space.path}: label space {space.name!r} has "
                     f"{space.num_classes} classes but the probe scores {c}")
  if space.multi_label and space.labels.shape[1] != c:
    raise ValueError(f"{space.path}: {space.labels.shape[1]}-column multi-hot "
                     f"labels for {c}-class scores")
  if not space.multi_label and space.labels.max() >= c:
    raise ValueError(f"{space.path}: label {int(space.labels.max())} outside the "
                     f"probe's {c} classes")
  if space.subset is not None and max(space.subset) >= c:
    raise ValueError(f"{space.path}: subset class {max(space.subset)} outside the "
                     f"probe's {c} classes")
  names = space.metric_names(top5)
  ranked_by_us = ("top1",) if topk_correct is not None else ("top1", "top5")
  ks = [int(m[3:]) for m in names if m in ranked_by_us]
  ranked = _run(accuracy.topk(ks), scores, space.labels) if ks else {}
  out = {}
  for name in names:
    if name in ranked:
      out[name] = ranked[name]
    elif name == "top5":
      out[name] = float(100.0 * np.mean(topk_correct(scores, space.labels, 5)))
    elif name == "real_top1":
      out[name] = _run(accuracy.real(), scores, space.labels)["top1"]
    elif name == "subset_top1":
      out[name] = _run(accuracy.subset(space.subset, "full"), scores,
                       space.labels)["top1"]
    else:
      out[name] = _run(accuracy.mean_per_class(c), scores,
                       space.labels)["mean_per_class"]
  return out


def _run(metric: accuracy.Metric, scores: np.ndarray,
         labels: np.ndarray) -> dict[str, float]:
  """``metric`` over fixed-size, zero-padded and masked chunks."""
  n = len(scores)
  chunk = min(_CHUNK, n)
  acc = MetricAccumulator(metric)
  # float64 scores (least squares) are ranked in float64, as the probes do.
  with jax.enable_x64(scores.dtype == np.float64):
    for start in range(0, n, chunk):
      s, y = scores[start:start + chunk], labels[start:start + chunk]
      valid = len(s)
      if valid < chunk:  # one shape for every chunk
        s = np.concatenate([s, np.zeros((chunk - valid,) + s.shape[1:], s.dtype)])
        y = np.concatenate([y, np.zeros((chunk - valid,) + y.shape[1:], y.dtype)])
      acc.update(s, y, np.arange(chunk) < valid)
    return acc.finalize()


def _single(y: np.ndarray, path: str) -> np.ndarray:
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{path}: labels must be (N,) class indices, got "
                     f"{y.shape} {y.dtype}")
  if y.min() < 0:
    raise ValueError(f"{path}: {int(np.sum(y < 0))} examples have unknown label -1")
  return y.astype(np.int64)


def _registry_space_json(dataset: str) -> dict[str, Any] | None:
  from sslbench_jax.data import registry  # pylint: disable=g-import-not-at-top
  if dataset not in registry.names():
    return None
  return registry.get_spec(dataset).info()["label_space"]


def _subset_indices(dataset, name, space, path) -> tuple[int, ...]:
  """The subset's class indices, from the registry (files record only its size)."""
  from sslbench_jax.data import registry  # pylint: disable=g-import-not-at-top
  for key in dict.fromkeys(k for k in (dataset, name) if k):
    if key in registry.names():
      try:
        subset = registry.get_spec(key).label_space(None).subset
      except Exception:  # pylint: disable=broad-except  (data-dependent spaces)
        subset = None
      if subset is not None:
        break
  else:
    raise ValueError(f"{path}: unknown label space {name!r} (dataset {dataset!r}): "
                     "it is scored by subset_top1 but no registered dataset gives "
                     f"its class subset; registered: {', '.join(registry.names())}")
  size = space.get("subset_size")
  if size is not None and int(size) != len(subset):
    raise ValueError(f"{path}: label space {name!r} records a {size}-class subset "
                     f"but the registry's {key!r} has {len(subset)} classes")
  return tuple(int(i) for i in subset)


def _subset_labels_to_full(y, subset, name, path) -> np.ndarray:
  """Labels of a subset test set, in the full class space.

  Both registry backends store 1000-class indices (TFDS's imagenet_r /
  imagenet_a label with the ImageNet-1k names file; the folder backends map
  wnids). A file labelled elsewhere with positions 0..S-1 into the sorted
  subset (an ImageFolder over the 200 wnid folders) is mapped through it.
  Full-space labels are all members of the subset, which decides.
  """
  sub = np.asarray(subset, np.int64)
  if np.isin(y, sub).all():
    return y
  if y.max() < len(sub):
    logging.warning("%s: %s labels are positions 0..%d into the class subset; "
                    "mapped to the full class space", path, name, len(sub) - 1)
    return sub[y]
  outside = np.unique(y[~np.isin(y, sub)])
  raise ValueError(f"{path}: labels {outside[:5].tolist()} are neither classes of "
                   f"{name!r}'s {len(sub)}-class subset nor positions into it")
