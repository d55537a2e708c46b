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
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
import tqdm

from sslbench_jax.probes import knn, leastsquares, linear
from sslbench_jax.probes._selection import check_finite, topk_hits

PROBES = ("knn", "linear", "leastsquares")
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


def run(train_features: np.ndarray,
        train_labels: np.ndarray,
        test_features: np.ndarray,
        test_labels: np.ndarray,
        num_classes: int,
        setups: Sequence[str] = DEFAULT_SETUPS,
        probes: Sequence[str] = PROBES,
        tries: int = 5,
        seed: int = 0,
        knn_k: int = 20,
        knn_metric: str = "cosine",
        l2: float = 2.0 ** 10,
        head: linear.HeadConfig | None = None,
        train_config: linear.TrainConfig | None = None,
        evaluate: Callable[[np.ndarray], Mapping[str, float]] | None = None,
        progress: bool = True,
        ) -> list[FewShotResult]:
  """Every (setup, probe) over ``tries`` subsets.

  Args:
    train_features: (N_train, D) pool the subsets are drawn from.
    train_labels: (N_train,).
    test_features: (N_test, D).
    test_labels: (N_test,); may be None when ``evaluate`` scores the test set.
    num_classes: C.
    setups: "Kshot" / "P%" strings.
    probes: subset of ``PROBES``.
    tries: subsets per setup.
    seed: base seed of the subsets (and of the linear heads).
    knn_k: neighbours (clipped to the subset size).
    knn_metric: "cosine" (DINO) or "euclidean".
    l2: regularisation of the closed-form probe.
    head: linear head (default SGD lr 0.1, no weight decay, no BN).
    train_config: linear training (default 100 epochs, batch
      min(256, subset), 5 warmup epochs, clip 0.5).
    evaluate: (N_test, C) test scores -> ``{metric: %}`` (e.g. the test label
      space's metrics); default: top-1 against ``test_labels``.
    progress: show a tqdm bar over the (setup, probe, try) evaluations on
      process 0 (the probes inside run without bars of their own).

  Returns:
    One ``FewShotResult`` per (setup, probe), setups outer.
  """
  unknown = sorted(set(probes) - set(PROBES))
  if unknown:
    raise ValueError(f"unknown few-shot probes {unknown}; valid: {list(PROBES)}")
  if tries < 1:
    raise ValueError(f"tries must be >= 1, got {tries}")
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
  head = head or linear.HeadConfig("x", lr=0.1)
  results = []
  bar = tqdm.tqdm(total=len(setups) * len(probes) * tries, unit="fit",
                  smoothing=0.1, desc="fewshot",
                  disable=not progress or jax.process_index() != 0)
  with bar:
    for setup in setups:
      shots, fraction = parse_setup(setup)
      per_class = per_class_count(ytr, num_classes, shots, fraction)
      subsets = [sample_subset(ytr, num_classes, shots, fraction, seed, t)
                 for t in range(tries)]
      for probe in probes:
        values: dict[str, list[float]] = {}
        for t, idx in enumerate(subsets):
          bar.set_postfix(setup=setup, probe=probe, refresh=False)
          scores = _scores(probe, xtr[idx], ytr[idx], xte, num_classes, knn_k,
                           knn_metric, l2, head, train_config, seed + t)
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


def _scores(probe, x, y, xte, num_classes, knn_k, knn_metric, l2, head,
            train_config, seed):
  if probe == "knn":
    return knn.classify(x, y, xte, num_classes, ks=(knn_k,), metric=knn_metric,
                        progress=False)[knn_k]   # inside the few-shot bar
  if probe == "leastsquares":
    return leastsquares.predict(leastsquares.precompute(x, y, num_classes), xte, l2)
  tc = train_config or linear.TrainConfig(batch_size=min(256, len(y)))
  tc = dataclasses.replace(tc, seed=seed)
  cfg = dataclasses.replace(head, source="x")
  heads = linear.train({"x": x}, y, num_classes, [cfg], tc, progress=False)
  return heads.logits({"x": xte}, 0)
