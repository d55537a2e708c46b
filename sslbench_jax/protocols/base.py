"""The types every evaluation protocol shares (the protocol table's row).

A protocol is a module exposing a frozen ``Options`` dataclass whose field
defaults are the paper's recipe (defined there once) and an entry point

  ``run(train, test, options, *, mesh, context) -> ProtocolResult``

``train`` / ``test`` are ``FeatureInputs`` (cached features, logits or a
released head's inputs) or ``ImageInputs`` (protocols that train through the
backbone: they build their own input pipeline). It is registered by one line
in ``protocols/registry.py``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

Consumes = Literal["features", "images", "logits", "head"]


@dataclasses.dataclass(frozen=True)
class FeatureInputs:
  """One split's cached features (one or several sources of the same examples).

  Attributes:
    features: source name -> (N, D) float array (normally one source; the
      linear probe accepts several, e.g. ``cls`` and ``avgpool``).
    labels: (N,) int64 class indices, or (N, C) bool multi-hot (a ReaL test
      set).
    meta: the (first) feature file's metadata: provenance and label space.
    path: the (first) cache file, for messages only; None for in-memory data.
    source_paths: per source (order of ``features``), its file (messages).
  """
  features: Mapping[str, np.ndarray]
  labels: np.ndarray
  meta: Mapping[str, Any]
  path: str | None = None
  source_paths: tuple[str, ...] = ()

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  @property
  def first(self) -> np.ndarray:
    """The first source's (N, D) features (single-source protocols)."""
    return next(iter(self.features.values()))

  @property
  def where(self) -> str:
    """How messages name this input: its file, else "<in memory>"."""
    return self.path or "<in memory>"


def load_features(paths: str | Sequence[str], flag: str = "features"
                  ) -> FeatureInputs:
  """Reads one feature file, or several (comma-separated: one per source).

  Sources are named by the files' ``meta["representation"]`` when those are
  all present and distinct, else ``s0, s1, ...`` (one file: its
  representation, else "features"). Every file must hold the same examples
  (equal labels).

  Args:
    paths: a path, comma-separated paths, or a list of paths.
    flag: how messages name the argument (e.g. "--features-train").

  Raises:
    ValueError / FileNotFoundError: naming ``flag`` or the offending file.
  """
  from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
  if not paths:
    raise ValueError(f"{flag} is required")
  if isinstance(paths, str):
    paths = paths.split(",")
  loaded = []
  for path in paths:
    path = str(path).strip()
    if not os.path.exists(path):
      raise FileNotFoundError(f"{flag}: no such file {path}")
    loaded.append((path, io.load(path)))
  path0, fs0 = loaded[0]
  for path, fs in loaded[1:]:
    if not np.array_equal(np.asarray(fs.labels), np.asarray(fs0.labels)):
      raise ValueError(f"{path}: labels differ from those of the first file; "
                       "sources must hold the same examples in the same order")
  names = _source_names([fs for _, fs in loaded])
  return FeatureInputs({n: fs.features for n, (_, fs) in zip(names, loaded)},
                       np.asarray(fs0.labels), dict(fs0.meta), path0,
                       tuple(p for p, _ in loaded))


def _source_names(feature_sets) -> list[str]:
  """Source names: the files' ``representation`` when distinct, else s0, s1..."""
  if len(feature_sets) == 1:
    return [str(feature_sets[0].meta.get("representation") or "features")]
  reps = [str(fs.meta.get("representation") or "") for fs in feature_sets]
  if all(reps) and len(set(reps)) == len(reps):
    return reps
  return [f"s{i}" for i in range(len(feature_sets))]


@dataclasses.dataclass(frozen=True)
class ImageInputs:
  """One split as the data layer names it (for protocols that train on images).

  Attributes:
    dataset: registered dataset name (``sslbench_jax.data``).
    split: split name.
    data_dir: where the data lives (None: the dataset's default).
    preprocessing: preprocessing preset name (None: the model's / default).
  """
  dataset: str
  split: str
  data_dir: str | None = None
  preprocessing: str | None = None


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What a protocol needs besides its inputs and options.

  Attributes:
    model: model name written to the rows (None: the training file's arch,
      else its file name).
    dataset: dataset name written to the rows (None: the test file's).
    split: split name written to the rows (None: the test file's, else "test").
    seed: seeds splits, subsets, initialisation and data order.
    num_classes: the class count (None: from the files' label spaces).
    progress: progress bars on stderr (process 0); no effect on results.
    workdir: a directory the protocol may write to (checkpoints), or None.
    weights_path: the converted weights (.npz) of the model, or None.
    weights_meta: their sidecar metadata, or None.
  """
  model: str | None = None
  dataset: str | None = None
  split: str | None = None
  seed: int = 0
  num_classes: int | None = None
  progress: bool = True
  workdir: str | None = None
  weights_path: str | None = None
  weights_meta: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class ProtocolResult:
  """What every protocol returns.

  Attributes:
    rows: results-store rows (``results/store.py``), full provenance.
    scores: config label -> metric -> value over the searched grid (held-out
      top-1 for selected protocols, the test metrics for kNN's k values).
    selected: label of the selected config (None: no selection).
  """
  rows: list[dict[str, Any]]
  scores: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  selected: str | None = None


# Common value rules for ``option(check=...)``.
POSITIVE = (lambda x: x > 0, "> 0")
NON_NEGATIVE = (lambda x: x >= 0, ">= 0")
FRACTION = (lambda x: 0 < x < 1, "in (0, 1)")


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None,
           check: tuple[Callable[[Any], bool], str] | None = None,
           default_text: str | None = None) -> Any:
  """A field of an options dataclass: its default (the recipe) and its rules.

  Args:
    default: the value the paper's recipe uses (a tuple for list options; None
      for "derived", explained by ``help``).
    help: one line for ``--help`` and the docs.
    choices: the allowed values (of every item for a list option).
    check: ``(predicate, words)`` every value (item) must satisfy, e.g.
      ``(lambda x: x > 0, "> 0")``.
    default_text: how ``--help`` shows the default (long tuples).
  """
  # pylint: disable=redefined-builtin
  return dataclasses.field(default=default, metadata=dict(
      help=help, choices=tuple(choices) if choices is not None else None,
      check=check, default_text=default_text))


def check_options(options: Any) -> None:
  """Raises ValueError naming the field when a value breaks its rules.

  Called by every options dataclass's ``__post_init__``: an options object
  that exists is valid (types, choices, ranges).
  """
  from sslbench_jax.protocols import _fields  # pylint: disable=g-import-not-at-top
  for spec in _fields.specs(type(options)):
    _fields.check(spec, getattr(options, spec.name), spec.name)


# run(train, test, options, *, mesh, context) -> ProtocolResult
RunFn = Callable[..., ProtocolResult]
# (x (N, D), y (N,), x_test, num_classes, options, *, seed, mesh) -> (N_test, C)
# scores of the single config ``options`` describes (few-shot's probes).
FitScoresFn = Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One row of the protocol table.

  Attributes:
    name: the protocol's name (``--protocol``, config ``type``).
    consumes: "features" (cached features of train and test), "images"
      (``ImageInputs``: trains through the backbone), "logits" (the test
      split's logits features) or "head" (the test split's features of a
      released head's representation; the head comes from
      ``context.weights_path``).
    options: the frozen options dataclass type; its field defaults are the
      recipe of ``reference``.
    run: the entry point ``run(train, test, options, *, mesh, context)``.
    reference: the paper / code the defaults come from.
    fit_scores: optional ``fit_scores(x, y, x_test, num_classes, options, *,
      seed, mesh) -> scores``: fit the one config ``options`` describes on
      (x, y) and score ``x_test`` (how few-shot runs a probe on a subset).
  """
  name: str
  consumes: Consumes
  options: type
  run: RunFn
  reference: str
  fit_scores: FitScoresFn | None = None
