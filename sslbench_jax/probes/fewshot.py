"""Few-shot probes: class-balanced label subsets, several seeded tries.

Subsets (``sample_subset``):
  * ``shots=k``: exactly ``k`` training examples of every class;
  * ``fraction=f``: ``int(f * N_train / C)`` examples of every class, the rule
    of "A Closer Look at Benchmarking Self-supervised Pre-training" (ImageNet:
    12 per class for 1%, 128 for 10%; not the SimCLR split files).
Sampling is without replacement, per class, from ``numpy.random.default_rng
([seed, try])``, so a (seed, try) pair always gives the same subset and
different tries give different subsets.

Each try fits a probe on the subset and evaluates it on the full test set
(top-1, or the metrics of an ``evaluate`` function given the test scores); a
setup reports the mean and the (population) std over tries. With so few labels
there is no held-out slice to select hyperparameters on, so every probe uses
fixed settings: kNN with ``k = min(k, subset size)``, one linear head, and the
closed-form least squares at one l2 (big_vision's default 2^10).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np
import tqdm

from sslbench_jax import parallel
from sslbench_jax.metrics import scoring
from sslbench_jax.probes import _rows, knn
from sslbench_jax.probes._selection import check_finite, topk_hits
from sslbench_jax.protocols.base import (NON_NEGATIVE, POSITIVE, FeatureInputs,
                                         Protocol, ProtocolResult, RunContext,
                                         check_options, option)

DEFAULT_SETUPS = ("1shot", "5shot", "10shot", "25shot", "1%", "10%")


@dataclasses.dataclass
class FewShotResult:
  """One (setup, probe) cell.

  Attributes:
    setup: e.g. "5shot" or "1%".
    probe: one of ``PROBES``.
    per_class: training examples per class in each subset.
    top1: per try, top-1 (%) on the test set (empty when ``evaluate`` gives
      no top-1, e.g. a multi-label test set).
    mean: mean of ``top1`` (NaN when empty).
    std: population std of ``top1`` (NaN when empty).
    n_test: test examples.
    metrics: per metric, its value (%) per try (``{"top1": top1}`` by default).
  """
  setup: str
  probe: str
  per_class: int
  top1: list[float]
  mean: float
  std: float
  n_test: int
  metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)

  @property
  def tries(self) -> int:
    return len(next(iter(self.metrics.values()), self.top1))


def parse_setup(setup: str) -> tuple[int | None, float | None]:
  """"5shot" -> (5, None); "1%" -> (None, 0.01)."""
  s = setup.strip().lower()
  try:
    if s.endswith("shot"):
      k = int(s[:-4].rstrip("-_ "))
      if k >= 1:
        return k, None
    elif s.endswith("%"):
      f = float(s[:-1]) / 100.0
      if 0 < f <= 1:
        return None, f
  except ValueError:
    pass
  raise ValueError(f"few-shot setup {setup!r} is not 'Kshot' (K >= 1) or 'P%' "
                   "(0 < P <= 100)")


def per_class_count(labels: np.ndarray, num_classes: int,
                    shots: int | None = None,
                    fraction: float | None = None) -> int:
  """Examples per class of a subset: ``shots`` or ``int(fraction * N / C)``."""
  if (shots is None) == (fraction is None):
    raise ValueError("give exactly one of shots and fraction")
  if shots is not None:
    return int(shots)
  n = int(fraction * len(labels) / num_classes)
  if n < 1:
    raise ValueError(f"{fraction:.2%} of {len(labels)} examples over "
                     f"{num_classes} classes is < 1 example per class")
  return n


def sample_subset(labels: np.ndarray, num_classes: int,
                  shots: int | None = None, fraction: float | None = None,
                  seed: int = 0, trial: int = 0) -> np.ndarray:
  """Class-balanced subset of training indices.

  Args:
    labels: (N,) training labels.
    num_classes: C; every class in [0, C) must have enough examples.
    shots: examples per class.
    fraction: label fraction (per class ``int(fraction * N / C)``).
    seed: base seed.
    trial: try index; (seed, trial) determines the subset.

  Returns:
    Sorted indices, ``per_class * C`` of them.

  Raises:
    ValueError: when a class has fewer examples than requested.
  """
  labels = np.asarray(labels)
  k = per_class_count(labels, num_classes, shots, fraction)
  rng = np.random.default_rng([seed, trial])
  picked = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < k:
      raise ValueError(f"class {c} has {len(idx)} training examples, fewer than "
                       f"the {k} per class requested")
    picked.append(rng.choice(idx, k, replace=False))
  return np.sort(np.concatenate(picked))


@dataclasses.dataclass(frozen=True)
class _Probe:
  """How few-shot runs one probe of the protocol table on a subset.

  Attributes:
    settings: (few-shot options, subset size) -> the probe's fixed options, as
      overrides of its protocol's defaults (there is no held-out slice to
      select on).
    hparams: (few-shot options, subset size) -> what its rows record.
  """
  settings: Callable[["Options", int], dict[str, Any]]
  hparams: Callable[["Options", int], dict[str, Any]]


def _knn_hparams(o: "Options", n: int) -> dict[str, Any]:
  # kNN on a subset of n examples uses at most that many neighbours.
  hp: dict[str, Any] = dict(k=min(o.fewshot_k, n), metric=o.knn_metric)
  if hp["k"] != o.fewshot_k:
    hp["k_requested"] = o.fewshot_k
  return hp


# Probe name (a protocol of ``protocols.registry`` with ``fit_scores``) -> its
# few-shot recipe: kNN with k = min(fewshot_k, subset) and the default
# temperature, one linear head (SGD lr 0.1, wd 0, no BN, batch min(256,
# subset), the linear recipe's epochs / warm-up / clip), least squares at
# fewshot_l2 (big_vision's 2^10).
PROBE_RECIPES: dict[str, _Probe] = {
    "knn": _Probe(lambda o, n: dict(knn_k=(o.fewshot_k,), knn_metric=o.knn_metric),
                  _knn_hparams),
    "linear": _Probe(lambda o, n: dict(lr=(0.1,), weight_decay=(0.0,),
                                       batchnorm=(False,), optimizer=("sgd",),
                                       batch_size=min(256, n)),
                     lambda o, n: {}),
    "leastsquares": _Probe(lambda o, n: dict(l2=(o.fewshot_l2,)),
                           lambda o, n: dict(l2=o.fewshot_l2)),
}
PROBES = tuple(PROBE_RECIPES)


def _valid_setup(setup: str) -> bool:
  try:
    parse_setup(setup)
  except ValueError:
    return False
  return True


@dataclasses.dataclass(frozen=True)
class Options:
  """The few-shot protocol's options; defaults: "A Closer Look at
  Benchmarking Self-supervised Pre-training" (1/5/10/25-shot, 1% and 10% of
  the labels, 5 tries) with kNN, linear and big_vision's least-squares probes."""
  setups: tuple[str, ...] = option(
      DEFAULT_SETUPS, "few-shot: 'Kshot' / 'P%' setups",
      check=(_valid_setup, "'Kshot' (K >= 1) or 'P%' (0 < P <= 100)"))
  fewshot_probes: tuple[str, ...] = option(PROBES, "few-shot: probes", choices=PROBES)
  tries: int = option(5, "few-shot: subsets per setup", check=POSITIVE)
  fewshot_l2: float = option(2.0 ** 10, "few-shot: l2 of the closed-form probe",
                             check=NON_NEGATIVE)
  fewshot_k: int = option(20, "few-shot: kNN neighbours", check=POSITIVE)
  # The kNN protocol's metric option (one flag for both protocols).
  knn_metric: str = dataclasses.field(
      default=knn.Options.knn_metric,
      metadata={f.name: f for f in dataclasses.fields(knn.Options)}["knn_metric"].metadata)

  def __post_init__(self):
    check_options(self)


def sweep(train_features: np.ndarray,
          train_labels: np.ndarray,
          test_features: np.ndarray,
          test_labels: np.ndarray | None,
          num_classes: int,
          options: Options = Options(),
          *,
          seed: int = 0,
          evaluate: Callable[[np.ndarray], Mapping[str, float]] | None = None,
          progress: bool = True,
          mesh: Any = None,
          probe_overrides: Mapping[str, Mapping[str, Any]] | None = None,
          ) -> list[FewShotResult]:
  """Every (setup, probe) of ``options`` over ``options.tries`` subsets.

  Each probe is the protocol of that name in ``protocols.registry``, run by
  its ``fit_scores`` with the fixed settings of ``PROBE_RECIPES``.

  Args:
    train_features: (N_train, D) pool the subsets are drawn from.
    train_labels: (N_train,).
    test_features: (N_test, D).
    test_labels: (N_test,); may be None when ``evaluate`` scores the test set.
    num_classes: C.
    options: setups, probes, tries and the probes' few-shot settings.
    seed: base seed of the subsets (and of the linear heads: seed + try).
    evaluate: (N_test, C) test scores -> ``{metric: %}`` (e.g. the test label
      space's metrics); default: top-1 against ``test_labels``.
    progress: show a tqdm bar over the (setup, probe, try) evaluations on
      process 0 (the probes inside run without bars of their own).
    mesh: the devices' mesh (None: every device).
    probe_overrides: probe -> option overrides on top of its few-shot
      settings (e.g. ``{"linear": {"epochs": 3}}``; tests, ablations).

  Returns:
    One ``FewShotResult`` per (setup, probe), setups outer.
  """
  from sslbench_jax.protocols import registry  # pylint: disable=g-import-not-at-top
  o = options
  xtr = np.asarray(train_features, np.float32)
  ytr = np.asarray(train_labels)
  xte = np.asarray(test_features, np.float32)
  check_finite("train_features", xtr)
  check_finite("test_features", xte)
  if evaluate is None:
    if test_labels is None:
      raise ValueError("few-shot: give test_labels or an evaluate function")
    yte = np.asarray(test_labels)
    evaluate = lambda s: {"top1": float(100.0 * topk_hits(s, yte, (1,))[0] / len(yte))}
  results = []
  bar = tqdm.tqdm(total=len(o.setups) * len(o.fewshot_probes) * o.tries, unit="fit",
                  smoothing=0.1, desc="fewshot",
                  disable=not progress or not parallel.is_writer())
  with bar:
    for setup in o.setups:
      shots, fraction = parse_setup(setup)
      per_class = per_class_count(ytr, num_classes, shots, fraction)
      subsets = [sample_subset(ytr, num_classes, shots, fraction, seed, t)
                 for t in range(o.tries)]
      for probe in o.fewshot_probes:
        protocol = registry.get(probe)
        settings = dict(PROBE_RECIPES[probe].settings(o, per_class * num_classes),
                        **(probe_overrides or {}).get(probe, {}))
        probe_options = dataclasses.replace(protocol.options(), **settings)
        values: dict[str, list[float]] = {}
        for t, idx in enumerate(subsets):
          bar.set_postfix(setup=setup, probe=probe, refresh=False)
          scores = protocol.fit_scores(xtr[idx], ytr[idx], xte, num_classes,
                                       probe_options, seed=seed + t, mesh=mesh)
          # ``evaluate`` reads the scores on the host: the bar's step is real.
          for name, value in evaluate(scores).items():
            values.setdefault(name, []).append(float(value))
          bar.update(1)
        accs = values.get("top1", [])
        results.append(FewShotResult(
            setup, probe, per_class, accs,
            float(np.mean(accs)) if accs else math.nan,
            float(np.std(accs)) if accs else math.nan, len(xte), values))
  return results


def run(train: FeatureInputs, test: FeatureInputs, options: Options = Options(), *,
        mesh: Any = None, context: RunContext = RunContext()) -> ProtocolResult:
  """The few-shot protocol: rows ``<metric>_mean`` / ``<metric>_std`` over
  tries per (setup, probe), protocol ``fewshot_<probe>``; the test set's own
  metrics without top-5."""
  p = _rows.prepare(train, test, context, "fewshot")
  o = options
  results = sweep(p.xtr, p.ytr, p.xte, p.yte, p.num_classes, o,
                  seed=int(context.seed), mesh=mesh,
                  evaluate=lambda s: scoring.evaluate(s, p.space, top5=False),
                  progress=bool(context.progress))
  scores = {}
  for r in results:
    hp = dict(setup=r.setup, per_class=r.per_class, tries=r.tries,
              **PROBE_RECIPES[r.probe].hparams(o, r.per_class * p.num_classes))
    cell = scores.setdefault(f"{r.probe}/{r.setup}", {})
    for metric, values in r.metrics.items():
      n = p.rows.n_examples(metric)
      for name, value in ((f"{metric}_mean", np.mean(values)),
                          (f"{metric}_std", np.std(values))):
        p.rows.add(f"fewshot_{r.probe}", hp, name, value, n)
        cell[name] = float(value)
  return ProtocolResult(p.rows.rows, scores, None)


PROTOCOL = Protocol(
    name="fewshot", consumes="features", options=Options, run=run,
    reference="A Closer Look at Benchmarking Self-supervised Pre-training "
    "(k-shot and percent-of-labels subsets); big_vision fewshot (least squares)")
