"""Synthetic results tables with known structure, for the analysis tests.

Accuracy = dataset base + model quality (shared across datasets) + backbone
and protocol offsets + noise, clipped to (1, 99). Not real measurements.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from sslbench_jax import atomic

from sslbench_jax.analysis import names

SYNTHETIC_PROTOCOLS = (("linear", {}), ("linear", {"final_batch_norm": True}),
                       ("knn", {"k": 20}), ("finetune", {}))
VARIANT_SIZES = {"imagenet_real": 46837, "imagenet_v2": 10000,
                 "imagenet_v2_threshold": 10000, "imagenet_v2_top": 10000,
                 "imagenet_r": 30000, "imagenet_sketch": 50889, "imagenet_a": 7500}


def synthetic_rows(models: list[str], datasets: dict[str, int], seed: int = 0,
                   with_variants: bool = True,
                   protocols=SYNTHETIC_PROTOCOLS) -> list[dict]:
  """Rows in the results-CSV layout.

  Args:
    models: model names (backbone inferred with ``names.parse_model_name``).
    datasets: {dataset name: test-set size}.
    seed: NumPy seed.
    with_variants: also emit ImageNet ReaL/v2/R/Sketch/A rows.
    protocols: (protocol, hparams) pairs.

  Returns:
    Row dicts with model, dataset, split, protocol, hparams, metric, value,
    n_examples.
  """
  rng = np.random.default_rng(seed)
  all_sets = dict(datasets)
  if with_variants:
    all_sets.update(VARIANT_SIZES)
  quality = rng.normal(0, 6, size=len(models))
  vit = np.array([names.parse_model_name(m).backbone == "ViT" for m in models])
  base = {d: rng.uniform(35, 80) for d in all_sets}
  rows = []
  for p_i, (protocol, hparams) in enumerate(protocols):
    p_off = rng.normal(0, 3)
    vit_off = rng.normal(0, 4)
    for m_i, model in enumerate(models):
      for d, n in all_sets.items():
        value = (base[d] + quality[m_i] + p_off + vit_off * vit[m_i]
                 + rng.normal(0, 2.5))
        rows.append({"model": model, "dataset": d,
                     "split": "validation" if d.startswith("imagenet") else "test",
                     "protocol": protocol, "hparams": json.dumps(hparams, sort_keys=True),
                     "metric": "top1", "value": round(float(np.clip(value, 1, 99)), 3),
                     "n_examples": int(n)})
  return rows


def write_csv(path: str, rows: list[dict]) -> None:
  """Writes rows (dicts with equal keys) as a CSV file, atomically."""
  with atomic.atomic_open(path, "w", newline="", suffix=".csv") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
