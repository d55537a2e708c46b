"""Scoring: a protocol's class scores -> the test set's metrics, in its own label space.

Every protocol ends with (N_test, C) class scores (or logits); scoring turns
them into ``{metric: %}`` the same way for all of them:

* ``top1`` / ``top5`` for single-label test sets;
* the metrics the test set's label space lists (``label_space.METRICS``):
  ``real_top1`` (ImageNet ReaL, multi-hot labels: an image counts when the
  top-1 prediction is in its label set; images with an empty set are not
  scored), ``subset_top1`` (ImageNet-R / -A: scores restricted to the class
  subset before the argmax), ``mean_per_class``.

The label space comes from the feature file itself
(``label_space.read_label_space``): no dataset registry lookup, except in
the clearly named compatibility path for files written before the class
subset was recorded.

Usage::

  test = scoring.resolve(fs.labels, fs.meta, path)
  values = scoring.evaluate(scores, test)                        # linear, logreg, ...
  values = scoring.evaluate(scores, test, positive_only_top5=True)  # kNN votes

Top-k everywhere is ``accuracy.ranked_hits`` (ties: lower class index);
``topk_correct`` runs it on NumPy arrays. The metric arithmetic runs over
padded, masked chunks of a fixed shape (one compilation per metric and shape),
float64 scores ranked in float64.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from sslbench_jax.metrics import accuracy
from sslbench_jax.metrics.accumulator import MetricAccumulator
from sslbench_jax.metrics.label_space import LabelSpace
from sslbench_jax.metrics.label_space import METRICS
from sslbench_jax.metrics.label_space import legacy_label_space
from sslbench_jax.metrics.label_space import read_label_space
from sslbench_jax.metrics.primary import PRIMARY
from sslbench_jax.metrics.primary import PRIMARY_METRICS
from sslbench_jax.metrics.primary import primary_metric

__all__ = ["EvalLabels", "LabelSpace", "METRICS", "PRIMARY", "PRIMARY_METRICS",
           "evaluate", "legacy_label_space", "primary_metric", "read_label_space",
           "resolve", "topk_correct"]

_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class EvalLabels:
  """A test set's labels in the scores' class space, and what to report.

  Attributes:
    path: the test file (for errors).
    space: its label space, or None when the file records none (plain
      single-label scoring by top-1 / top-5).
    labels: (N,) int64 class indices in the full space, or (N, C) bool
      multi-hot (ReaL).
  """
  path: str
  space: LabelSpace | None
  labels: np.ndarray

  @property
  def name(self) -> str | None:
    return None if self.space is None else self.space.name

  @property
  def num_classes(self) -> int | None:
    return None if self.space is None else self.space.num_classes

  @property
  def metrics(self) -> tuple[str, ...]:
    """The label space's metrics, primary first (``("top1",)`` without a space)."""
    return ("top1",) if self.space is None else self.space.metrics

  @property
  def subset(self) -> tuple[int, ...] | None:
    return None if self.space is None else self.space.subset

  @property
  def multi_label(self) -> bool:
    return self.labels.ndim == 2

  @property
  def single_labels(self) -> np.ndarray | None:
    """(N,) class indices, or None for a multi-label test set."""
    return None if self.multi_label else self.labels

  @property
  def num_scored(self) -> int:
    """Examples scored: ReaL leaves out images with an empty label set."""
    return int(self.labels.any(1).sum()) if self.multi_label else len(self.labels)

  def n_examples(self, metric: str) -> int:
    """The ``n_examples`` of a row of ``metric`` (ReaL: the scored images)."""
    return self.num_scored if metric == "real_top1" else len(self.labels)

  def metric_names(self, top5: bool = True) -> tuple[str, ...]:
    """Names ``evaluate`` returns: the space's metrics, then top1 (and top5)."""
    names = list(self.metrics)
    if not self.multi_label:
      names += [m for m in ("top1", "top5")[:2 if top5 else 1] if m not in names]
    return tuple(names)


def resolve(labels: np.ndarray, meta: Mapping[str, Any], path: str) -> EvalLabels:
  """Reads a test feature file's label space and normalises its labels.

  Args:
    labels: the file's labels ((N,) ints, or (N, C) multi-hot).
    meta: the file's meta (its label space: ``label_space.read_label_space``).
    path: the file, for errors.

  Returns:
    ``EvalLabels``; subset (ImageNet-R / -A) labels stored as positions
    0..S-1 into the subset are mapped to the full class space.

  Raises:
    ValueError: one line naming ``path``: unknown metric names or label
      space, labels that do not fit the label space, unknown (-1) labels,
      no examples.
  """
  space = read_label_space(meta, path)
  y = np.asarray(labels)
  if len(y) == 0:
    raise ValueError(f"{path}: no examples")
  if space is None:
    if y.ndim != 1:
      raise ValueError(f"{path}: multi-hot (N, C) labels but no label space in its "
                       "meta (meta['source']['label_space'] or a registered "
                       "meta['dataset']); cannot tell how to score them")
    return EvalLabels(path, None, _single(y, path))
  name, multi = space.name, space.multi_label
  if multi or y.ndim == 2:
    if not (multi and y.ndim == 2 and space.metrics == ("real_top1",)):
      raise ValueError(
          f"{path}: labels of shape {y.shape} do not fit label space {name!r} "
          f"(multi_label={multi}, metrics={list(space.metrics)}); multi-hot (N, C) "
          "labels are scored by real_top1 only")
    if space.num_classes is not None and y.shape[1] != space.num_classes:
      raise ValueError(f"{path}: multi-hot labels have {y.shape[1]} columns but "
                       f"label space {name!r} has {space.num_classes} classes")
    if not np.isin(y, (0, 1)).all():
      raise ValueError(f"{path}: multi-hot labels must be 0/1")
    return EvalLabels(path, space, y.astype(bool))
  y = _single(y, path)
  if "subset_top1" in space.metrics:
    if space.subset is None:
      raise ValueError(f"{path}: unknown label space {name!r}: it is scored by "
                       "subset_top1 but neither the file nor a registered dataset "
                       "gives its class subset")
    y = _subset_labels_to_full(y, space.subset, name, path)
  return EvalLabels(path, space, y)


def evaluate(scores: np.ndarray,
             test: EvalLabels,
             *,
             top5: bool = True,
             positive_only_top5: bool = False) -> dict[str, float]:
  """A protocol's test metrics, in percent.

  Args:
    scores: (N_test, C) class scores or logits, C the training label space's
      size.
    test: the test set (``resolve``).
    top5: also report top-5 (single-label test sets).
    positive_only_top5: top-5 counts only classes with a score > 0 (kNN vote
      totals: a class without votes never counts; ``accuracy.ranked_hits``).

  Returns:
    ``{name: %}`` in the order of ``test.metric_names(top5)``.

  Raises:
    ValueError: scores whose shape does not fit the test labels.
  """
  scores = np.asarray(scores)
  n = len(test.labels)
  if scores.ndim != 2 or len(scores) != n:
    raise ValueError(f"{test.path}: scores of shape {scores.shape} for {n} test "
                     "examples")
  c = scores.shape[1]
  if test.num_classes is not None and c != test.num_classes:
    raise ValueError(f"{test.path}: label space {test.name!r} has "
                     f"{test.num_classes} classes but the probe scores {c}")
  if test.multi_label and test.labels.shape[1] != c:
    raise ValueError(f"{test.path}: {test.labels.shape[1]}-column multi-hot "
                     f"labels for {c}-class scores")
  if not test.multi_label and test.labels.max() >= c:
    raise ValueError(f"{test.path}: label {int(test.labels.max())} outside the "
                     f"probe's {c} classes")
  if test.subset is not None and max(test.subset) >= c:
    raise ValueError(f"{test.path}: subset class {max(test.subset)} outside the "
                     f"probe's {c} classes")
  names = test.metric_names(top5)
  plain = ("top1",) if positive_only_top5 else ("top1", "top5")
  ks = [int(m[3:]) for m in names if m in plain]
  ranked = _run(accuracy.topk(ks), scores, test.labels) if ks else {}
  out = {}
  for name in names:
    if name in ranked:
      out[name] = ranked[name]
    elif name == "top5":
      # a mean of per-example hits, as kNN's top-5 always was computed (the
      # stored values stay the same to the last bit)
      hits = topk_correct(scores, test.labels, 5, positive_only=True)
      out[name] = float(100.0 * np.mean(hits))
    elif name == "real_top1":
      out[name] = _run(accuracy.real(), scores, test.labels)["top1"]
    elif name == "subset_top1":
      out[name] = _run(accuracy.subset(test.subset, "full"), scores,
                       test.labels)["top1"]
    else:
      out[name] = _run(accuracy.mean_per_class(c), scores,
                       test.labels)["mean_per_class"]
  return out


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int, *,
                 positive_only: bool = False) -> np.ndarray:
  """Whether each example's label is among its ``k`` best-scored classes.

  The package's top-k (``accuracy.ranked_hits``) on NumPy arrays of any
  size: classes ranked by score, ties to the lower class index; float64
  scores ranked in float64.

  Args:
    scores: (N, C) scores.
    labels: (N,) class indices.
    k: how many classes count.
    positive_only: a class with score <= 0 never counts (kNN: no votes).

  Returns:
    (N,) bool.
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  if scores.ndim != 2 or labels.shape != (len(scores),):
    raise ValueError(f"top-k: scores {scores.shape} and labels {labels.shape} do not "
                     "fit ((N, C) and (N,))")
  n = len(scores)
  if n == 0:
    return np.zeros((0,), bool)
  chunk = min(_CHUNK, n)
  fn = _topk_correct_fn(int(k), bool(positive_only))
  out = []
  with jax.enable_x64(scores.dtype == np.float64):
    for start in range(0, n, chunk):
      s, y = _padded(scores[start:start + chunk], chunk), _padded(
          labels[start:start + chunk], chunk)
      out.append(np.asarray(fn(s, y))[:min(chunk, n - start)])
  return np.concatenate(out)


@functools.lru_cache(maxsize=None)
def _topk_correct_fn(k: int, positive_only: bool):
  return jax.jit(lambda s, y: accuracy.topk_hits(s, y, k, positive_only=positive_only))


def _padded(a: np.ndarray, rows: int) -> np.ndarray:
  """``a`` zero-padded to ``rows`` rows (one shape for every chunk)."""
  if len(a) == rows:
    return a
  return np.concatenate([a, np.zeros((rows - len(a),) + a.shape[1:], a.dtype)])


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
      acc.update(_padded(s, chunk), _padded(y, chunk), np.arange(chunk) < valid)
    return acc.finalize()


def _single(y: np.ndarray, path: str) -> np.ndarray:
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{path}: labels must be (N,) class indices, got "
                     f"{y.shape} {y.dtype}")
  if y.min() < 0:
    raise ValueError(f"{path}: {int(np.sum(y < 0))} examples have unknown label -1")
  return y.astype(np.int64)


def _subset_labels_to_full(y, subset, name, path) -> np.ndarray:
  """Labels of a subset test set, in the full class space.

  Both registry backends store 1000-class indices (TFDS's imagenet_r /
  imagenet_a label with the ImageNet-1k names file; the folder backends map
  wnids). A file labelled elsewhere with positions 0..S-1 into the
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
