"""What every cached-feature protocol shares: input checks and result rows.

``prepare`` validates a (train, test) pair of ``FeatureInputs`` once: training
labels, the test file's label space (``metrics.scoring.resolve``), the class
count both sides agree on, and the warnings that qualify every row (test
examples of classes the training set never has). ``Rows`` then builds the
results-store rows with their provenance (``results/store.py``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from sslbench_jax.metrics import scoring
from sslbench_jax.protocols.base import FeatureInputs, RunContext


def devices(mesh: Any) -> Sequence[jax.Device] | None:
  """The devices of ``mesh`` (None: the protocol's default, every device)."""
  return None if mesh is None else list(np.asarray(mesh.devices).flat)


@dataclasses.dataclass
class Prepared:
  """A checked (train, test) pair.

  Attributes:
    ytr: (N_train,) int64 training labels.
    space: the test file's label space and labels.
    num_classes: C.
    train: source -> (N_train, D) training features.
    test: source -> (N_test, D) test features, keyed like ``train``.
    rows: the row builder.
  """
  ytr: np.ndarray
  space: scoring.EvalLabels
  num_classes: int
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  rows: "Rows"

  @property
  def yte(self) -> np.ndarray | None:
    """(N_test,) class indices, None for a multi-label (ReaL) test set."""
    return self.space.single_labels

  @property
  def xtr(self) -> np.ndarray:
    return next(iter(self.train.values()))

  @property
  def xte(self) -> np.ndarray:
    return next(iter(self.test.values()))


def prepare(train: FeatureInputs, test: FeatureInputs, context: RunContext,
            protocol: str, *, multi_source: bool = False) -> Prepared:
  """Checks a (train, test) pair and resolves labels, label space and classes.

  Raises:
    ValueError: naming the file: mismatched sources or dimensions, training
      labels that are not single-label class indices, label spaces that
      disagree, labels beyond the class count.
  """
  if len(train.features) != len(test.features):
    raise ValueError(f"--features-train has {len(train.features)} files but "
                     f"--features-test has {len(test.features)}")
  if len(train.features) > 1 and not multi_source:
    raise ValueError(f"several feature files (sources) are only supported by "
                     f"--protocol linear, not {protocol}")
  path_tr = train.where
  ytr = train_labels(train.labels, path_tr)
  space = scoring.resolve(test.labels, test.meta, test.where)
  paths_tr = train.source_paths or (path_tr,) * len(train.features)
  paths_te = test.source_paths or (test.where,) * len(test.features)
  for x_tr, x_te, p_tr, p_te in zip(train.features.values(), test.features.values(),
                                    paths_tr, paths_te):
    if x_tr.shape[1] != x_te.shape[1]:
      raise ValueError(f"feature dims differ: {p_tr} has {x_tr.shape[1]}, {p_te} "
                       f"has {x_te.shape[1]}")
  for what, fi in (("train", train), ("test", test)):
    for source, x in fi.features.items():
      if len(x) != len(fi.labels):
        raise ValueError(f"{fi.where}: {what} source {source!r} has {len(x)} rows "
                         f"but {len(fi.labels)} labels")
  num_classes = resolve_num_classes(context.num_classes, train.meta, path_tr, ytr,
                                    space)
  # Problems that do not invalidate the numbers but qualify them: logged and
  # recorded in every row's hparams["warnings"].
  warnings = unseen_test_classes(ytr, space, path_tr)
  # The test sources are matched to the training ones by position.
  test_features = dict(zip(train.features, test.features.values()))
  return Prepared(ytr, space, num_classes, dict(train.features), test_features,
                  Rows(train, test, context, space, warnings))


class Rows:
  """Results-store rows of one protocol run, in the order they are added."""

  def __init__(self, train: FeatureInputs | None, test: FeatureInputs,
               context: RunContext, space: scoring.EvalLabels,
               warnings: Sequence[str] = ()):
    self.space = space
    self.warnings = list(warnings)
    self.rows: list[dict[str, Any]] = []
    self.n_test = test.num_examples
    meta_tr = train.meta if train is not None else {}
    self.base = dict(
        model=context.model or meta_tr.get("arch") or
        os.path.splitext(os.path.basename(train.where if train else "features"))[0],
        # The released checkpoint's hash (recorded by convert, carried by
        # features); the converted weights' own hash for other weights files.
        checkpoint_sha256=str(meta_tr.get("checkpoint_sha256")
                              or meta_tr.get("weights_sha256", "")),
        dataset=context.dataset or test.meta.get("dataset") or "unknown",
        split=str(context.split or test.meta.get("split") or "test"),
        seed=int(context.seed), device_count=jax.device_count())
    # How the features were made is part of every number's provenance.
    self.provenance = {name: meta_tr[key] for name, key in
                       (("preprocessing", "preprocessing"), ("features_dtype", "dtype"))
                       if meta_tr.get(key) is not None}
    test_pre = test.meta.get("preprocessing")
    if test_pre is not None and test_pre != meta_tr.get("preprocessing"):
      self.provenance["test_preprocessing"] = test_pre

  def n_examples(self, metric: str) -> int:
    """Test examples a metric counts (ReaL: those with a label)."""
    return self.space.n_examples(metric)

  def add(self, protocol: str, hparams: Mapping[str, Any], metric: str,
          value: float, n: int | None = None) -> None:
    """One row; ``hparams["warnings"]`` joins the run's own warnings."""
    hparams = dict(self.provenance, **hparams)
    row_warnings = self.warnings + list(hparams.pop("warnings", []))
    if row_warnings:
      hparams["warnings"] = row_warnings
    self.rows.append(dict(self.base, protocol=protocol, hparams=hparams,
                          metric=metric, value=float(value),
                          n_examples=int(n if n is not None else
                                         self.n_examples(metric))))

  def add_metrics(self, protocol: str, hparams: Mapping[str, Any],
                  scores: np.ndarray, **kwargs: Any) -> dict[str, float]:
    """One row per test metric of ``scores``; returns the metrics."""
    values = scoring.evaluate(scores, self.space, **kwargs)
    for metric, value in values.items():
      self.add(protocol, hparams, metric, value)
    return values


def train_labels(labels: np.ndarray, path: str) -> np.ndarray:
  """(N,) int64 training labels; ValueError naming ``path`` otherwise."""
  y = np.asarray(labels)
  if y.ndim != 1:
    raise ValueError(f"{path}: multi-hot {y.shape} training labels are not "
                     "supported; probes train on single-label (N,) class indices "
                     "(multi-hot labels are for a ReaL test set)")
  if len(y) == 0:
    raise ValueError(f"{path}: no examples")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{path}: labels must be integers, got {y.dtype}")
  if y.min() < 0:
    raise ValueError(f"{path}: {int(np.sum(y < 0))} examples have unknown label -1")
  return y.astype(np.int64)


def resolve_num_classes(requested: int | None, train_meta: Mapping[str, Any],
                        path_tr: str, ytr: np.ndarray,
                        space: scoring.EvalLabels) -> int:
  """The probe's class count; the train and test label spaces must agree on it.

  ``requested`` (--num-classes), else the training file's label space (or
  meta num_classes), else the test file's label space, else the largest
  label + 1.
  """
  path_te = space.path
  train_space = scoring.read_label_space(train_meta, path_tr)
  train_c = (train_space.num_classes if train_space else None) or train_meta.get(
      "num_classes")
  if train_c and space.num_classes and int(train_c) != space.num_classes:
    raise ValueError(
        f"label spaces differ: {path_tr} has {int(train_c)} classes "
        f"({train_space.name if train_space else 'meta num_classes'}), {path_te} has "
        f"{space.num_classes} ({space.name}); a probe trained on one cannot be "
        "scored on the other")
  label_max = int(ytr.max()) if space.multi_label else int(max(ytr.max(),
                                                                space.labels.max()))
  num_classes = int(requested or train_c or space.num_classes or label_max + 1)
  if space.num_classes and num_classes != space.num_classes:
    raise ValueError(f"--num-classes {num_classes} but {path_te}'s label space "
                     f"{space.name} has {space.num_classes} classes")
  if label_max >= num_classes:
    raise ValueError(f"labels exceed --num-classes {num_classes} (largest label "
                     f"{label_max} in {path_tr} / {path_te})")
  return num_classes


def unseen_test_classes(ytr: np.ndarray, space: scoring.EvalLabels,
                        path_tr: str) -> list[str]:
  """Warnings (logged) when test examples belong to no training class.

  A probe cannot predict a class it never saw, so those examples count as
  errors: the number is still what the protocol gives, but lower than the
  representation deserves, and the row says so.
  """
  seen = np.unique(ytr)
  if space.multi_label:
    labelled = space.labels.any(1)
    # Examples all of whose correct classes are unseen can never be right.
    hopeless = labelled & ~space.labels[:, seen].any(1)
    classes = np.flatnonzero(space.labels.any(0) & ~np.isin(
        np.arange(space.labels.shape[1]), seen))
  else:
    hopeless = ~np.isin(space.labels, seen)
    classes = np.unique(space.labels[hopeless])
  if not len(classes):
    return []
  # The row's text names no file: rows of the same measurement made from
  # files elsewhere must stay equal (hparams are part of the store's key).
  msg = (f"{int(hopeless.sum())} of {len(space.labels)} test examples belong to "
         f"{len(classes)} classes absent from the training classes (e.g. "
         f"{classes[:5].tolist()}); the probe can never predict them")
  logging.warning("%s (test %s, train %s)", msg, space.path, path_tr)
  return [msg]


def label(config: Mapping[str, Any]) -> str:
  """A grid point's label in ``ProtocolResult.scores``: ``k1=v1,k2=v2``."""
  return ",".join(f"{k}={v}" for k, v in config.items())
