"""Published PyTorch numbers (package data) and our-vs-published comparison.

``published_baselines.csv`` lists ImageNet linear-probe / kNN top-1 of
ResNet-50 SSL checkpoints with the source of every number. Rows whose source
says "from memory; NOT verified" are kept but flagged ``verified=False``.

Which published row corresponds to which of our models is written out in
``MODEL_TO_BASELINE`` (several releases of one method differ in epochs and
crops); a model not listed there has no baseline.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources

import numpy as np

from sslbench_jax.analysis import names
from sslbench_jax.analysis.table import ResultsTable

# The protocol that scores a framework's released ImageNet linear classifier.
RELEASED_HEAD = "released_head"
COMPARISON_COLUMNS = ("model", "protocol", "ours", "published", "delta",
                      "published_method", "verified", "note", "source")

# (method key, backbone) -> (published "method" cell, note on the match).
MODEL_TO_BASELINE: dict[tuple[str, str], tuple[str, str]] = {
    ("dino", "ResNet"): ("DINO", ""),
    ("swav", "ResNet"): ("SwAV (800ep; bs4096; 2x224+6x96)", ""),
    ("deepcluster_v2", "ResNet"): ("DeepCluster-v2 (800ep; 2x224+6x96)", ""),
    ("sela_v2", "ResNet"): ("SeLa-v2 (400ep; 2x160+4x96)", ""),
    ("moco_v2", "ResNet"): ("MoCo v2 (800ep)", ""),
    ("simclr", "ResNet"): ("SimCLR v1 (paper)",
                           "our checkpoint is VISSL's 1000ep re-training"),
    ("byol", "ResNet"): ("BYOL (paper)",
                         "our checkpoint is an unofficial PyTorch re-implementation"),
    ("simsiam", "ResNet"): ("SimSiam (100ep; bs256)",
                            "epochs differ: our checkpoint is MMSelfSup 200ep"),
    ("barlowtwins", "ResNet"): ("Barlow Twins (1000ep; bs2048)",
                                "epochs differ: our checkpoint is MMSelfSup 300ep"),
    ("moco_v1", "ResNet"): ("MoCo v1 (200ep)", ""),
    ("simclr_v2", "ResNet"): ("SimCLR v2 (r50_1x_sk0)", ""),
    ("pcl_v1", "ResNet"): ("PCL v1 (200ep)", ""),
    ("pcl_v2", "ResNet"): ("PCL v2 (200ep)", ""),
    ("obow", "ResNet"): ("OBoW (200ep; bs256)", ""),
    ("vicreg", "ResNet"): ("VICReg (1000ep)", ""),
    ("supervised", "ResNet"): ("Supervised (torchvision v1 weights; reference)",
                               "torchvision's supervised ResNet-50 (v1 weights)"),
}


@dataclasses.dataclass(frozen=True)
class Baseline:
  """One published number."""
  method: str
  backbone: str
  protocol: str       # "linear" or "knn" or the raw text for other protocols
  top1: float
  source: str
  verified: bool


def normalize_protocol(text: str) -> str:
  """Published protocol text -> our protocol name ("linear", "knn", ...).

  A supervised network's published accuracy is that of its own classifier
  head: our ``classify`` protocol.
  """
  t = text.strip().lower()
  if t.startswith("linear"):
    return "linear"
  if t.replace("-", "").startswith("knn"):
    return "knn"
  if t.startswith("supervised"):
    return "classify"
  return t


def framework_of(published_method: str) -> str | None:
  """Method key (``names.METHODS``) of a published row's ``method`` cell.

  The cell is "<framework> (<release details>)", e.g. "PCL v2 (200ep)";
  the framework part is read with ``names.parse_model_name``.
  """
  return names.parse_model_name(published_method.split(" (")[0]).method


def load_baselines(path: str | None = None) -> list[Baseline]:
  """Reads the published baselines (default: the packaged CSV).

  Args:
    path: optional CSV with columns method, backbone, protocol, top1, source.

  Returns:
    List of ``Baseline``.
  """
  if path is None:
    text = (importlib.resources.files("sslbench_jax.analysis")
            / "published_baselines.csv").read_text()
  else:
    with open(path) as f:
      text = f.read()
  out = []
  for i, row in enumerate(csv.DictReader(text.splitlines())):
    try:
      out.append(Baseline(row["method"], row["backbone"],
                          normalize_protocol(row["protocol"]), float(row["top1"]),
                          row["source"], "not verified" not in row["source"].lower()))
    except (KeyError, ValueError) as e:
      raise ValueError(f"published baselines row {i + 1} is malformed: {e}") from None
  return out


def baselines_for_model(model: str, baselines: list[Baseline]) -> tuple[list[Baseline], str]:
  """The published rows matching one of our model names, and the match note.

  The release is ``MODEL_TO_BASELINE``'s, unless the name gives epochs
  (``moco_v2_200ep``) and exactly one published release of that framework
  has them ("MoCo v2 (200ep)").
  """
  info = names.parse_model_name(model)
  entry = MODEL_TO_BASELINE.get((info.method, info.backbone))
  if entry is None:
    return [], ""
  method, note = entry
  if info.epochs is not None:
    same = {b.method for b in baselines if framework_of(b.method) == info.method
            and f"({info.epochs}ep" in b.method}
    if len(same) == 1:
      method, note = same.pop(), ""
  return [b for b in baselines if b.method == method], note


def compare(table: ResultsTable, baselines: list[Baseline] | None = None) -> list[dict]:
  """Our ImageNet top-1 vs the published number, per model and protocol.

  Args:
    table: the results (the ``imagenet`` column of each protocol is used;
      protocols labelled ``+bn`` are not compared).
    baselines: default ``load_baselines()``.

  Returns:
    Rows with ``COMPARISON_COLUMNS``; ``ours``/``delta`` NaN when we have no
    number for that protocol; ``delta = ours - published``. A model with a
    ``released_head`` number also gets a row comparing it with the published
    linear number.
  """
  baselines = load_baselines() if baselines is None else baselines
  rows = []
  for model in table.models:
    matched, note = baselines_for_model(model, baselines)
    for b in matched:
      # A released linear head scored by us is compared with the published
      # linear number too (same head, our evaluation).
      protocols = [b.protocol] + (
          [RELEASED_HEAD] if b.protocol == "linear"
          and (model, RELEASED_HEAD, names.IN_DOMAIN) in table.values else [])
      for protocol in protocols:
        ours = table.values.get((model, protocol, names.IN_DOMAIN), np.nan)
        rows.append({"model": model, "protocol": protocol, "ours": float(ours),
                     "published": b.top1, "delta": float(ours - b.top1),
                     "published_method": b.method, "verified": b.verified,
                     "note": note, "source": b.source})
  return rows
