"""Stored classifiers scored on the test split: ``classify`` and ``released_head``.

* ``classify``: the backbone's own classifier -- the test split's ``logits``
  features are the class scores.
* ``released_head``: a released linear head stored with the converted weights
  (``convert``: ``logits = features @ W.T + b`` on the test features of the
  head's representation); the rows carry the head's provenance.

Neither trains anything, so neither has options or a training split. Both are
scored like every probe (``metrics/scoring.py``): top-1 / top-5,
``real_top1`` on ReaL, ``subset_top1`` on ImageNet-R / -A.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from sslbench_jax.metrics import scoring
from sslbench_jax.protocols.base import (FeatureInputs, Protocol, ProtocolResult,
                                         RunContext)


@dataclasses.dataclass(frozen=True)
class Options:
  """No options: the stored classifier is scored as it is."""


def _rows(test: FeatureInputs, base: dict[str, Any],
          scores_fn: Callable[[np.ndarray], np.ndarray] | None) -> list[dict[str, Any]]:
  """One row per test metric of ``scores_fn(test features)``."""
  space = scoring.resolve(test.labels, test.meta, test.where)
  try:
    x = test.first
    scores = x if scores_fn is None else scores_fn(x)
    values = scoring.evaluate(scores, space)
  except ValueError as e:
    raise ValueError(f"classify {base['model']} on {base['dataset']}: the model's head "
                     f"does not fit the test set: {e}") from None
  # ReaL counts only the images with a non-empty label set.
  return [dict(base, metric=k, value=float(v), n_examples=space.num_scored)
          for k, v in values.items()]


def _base(protocol: str, test: FeatureInputs, context: RunContext) -> dict[str, Any]:
  return dict(model=context.model or test.meta.get("arch") or "unknown",
              dataset=context.dataset or test.meta.get("dataset") or "unknown",
              split=str(context.split or test.meta.get("split") or "test"),
              protocol=protocol, hparams={}, seed=int(context.seed),
              device_count=jax.device_count(),
              checkpoint_sha256=str((context.weights_meta or test.meta)
                                    .get("checkpoint_sha256", "")))


def run_classify(train: FeatureInputs | None, test: FeatureInputs,
                 options: Options = Options(), *, mesh: Any = None,
                 context: RunContext = RunContext()) -> ProtocolResult:
  """The model's own classifier: ``test`` holds its logits features.

  ``train`` is not used (None is fine); ``context.weights_meta`` gives the
  rows' ``checkpoint_sha256`` (else the test file's meta).
  """
  del train, options, mesh
  return ProtocolResult(_rows(test, _base("classify", test, context), None))


def run_released_head(train: FeatureInputs | None, test: FeatureInputs,
                      options: Options = Options(), *, mesh: Any = None,
                      context: RunContext = RunContext()) -> ProtocolResult:
  """The released head stored with ``context.weights_path``, on ``test`` (the
  features of the head's representation, ``head_representation``)."""
  del train, options, mesh
  from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  from sslbench_jax.convert import heads  # pylint: disable=g-import-not-at-top
  base = _base("released_head", test, context)
  stored = (weights.load_released_head(context.weights_path)
            if context.weights_path else None)
  if stored is None:
    raise ValueError(f"released_head {base['model']}: {context.weights_path} carries no "
                     "released head (give the model head=FILE, or a checkpoint with its "
                     "classifier)")
  head = heads.from_stored(*stored)
  entry = stored[1]
  base = dict(base, hparams=dict(base.get("hparams") or {}, head=entry.get("source_file"),
                                 head_sha256=entry.get("source_sha256"),
                                 head_layout=entry.get("layout"),
                                 representation=entry.get("representation")))
  return ProtocolResult(_rows(test, base, head.logits))


def head_representation(weights_meta: dict[str, Any]) -> str:
  """The representation a stored released head applies to (weights sidecar)."""
  return (weights_meta.get("released_head") or {}).get("representation") or "pre_logits"


CLASSIFY = Protocol(
    name="classify", consumes="logits", options=Options, run=run_classify,
    reference="the backbone's own classifier head (logits features)")
RELEASED_HEAD = Protocol(
    name="released_head", consumes="head", options=Options, run=run_released_head,
    reference="the linear head released with the checkpoint (convert.heads)")
