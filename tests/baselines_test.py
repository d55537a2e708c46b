"""Published baselines: package data, verified flags, model matching, deltas."""

import csv
import math
import os

import pytest

from conftest import SHARED
from sslbench_jax.analysis import baselines
from sslbench_jax.analysis import table as table_lib

SHARED_CSV = os.path.join(SHARED, "reference", "published_baselines.csv")


def test_packaged_csv_loads_and_flags_unverified():
  rows = baselines.load_baselines()
  assert len(rows) == 30
  unverified = {b.method for b in rows if not b.verified}
  assert unverified == {"SimCLR v1 (paper)", "BYOL (paper)", "SimSiam (800ep; paper)",
                        "Barlow Twins (paper)"}
  dino = {b.protocol: b.top1 for b in rows if b.method == "DINO"}
  assert dino == {"linear": 75.3, "knn": 67.5}
  assert all(b.source for b in rows)


def test_packaged_csv_equals_shared_reference():
  if not os.path.exists(SHARED_CSV):
    pytest.skip(f"{SHARED_CSV} not present")
  with open(SHARED_CSV) as f:
    ref = list(csv.DictReader(f))
  got = baselines.load_baselines()
  assert [(r["method"], float(r["top1"]), r["source"]) for r in ref] == \
         [(b.method, b.top1, b.source) for b in got]


def test_every_mapping_points_at_an_existing_row():
  methods = {b.method for b in baselines.load_baselines()}
  for key, (method, _) in baselines.MODEL_TO_BASELINE.items():
    assert method in methods, key


@pytest.mark.parametrize("model,expected", [
    ("swav_rn50", "SwAV (800ep; bs4096; 2x224+6x96)"),
    ("SwAV", "SwAV (800ep; bs4096; 2x224+6x96)"),
    ("dino_resnet50", "DINO"),
    ("dino_vitb16", None),           # only the ResNet-50 DINO is published here
    ("moco_v2_rn50", "MoCo v2 (800ep)"),
    ("siamsiam_rn50", "SimSiam (100ep; bs256)"),
    ("mae_vitb16", None),
    ("unknown_thing", None),
])
def test_model_matching(model, expected):
  matched, _ = baselines.baselines_for_model(model, baselines.load_baselines())
  assert ({b.method for b in matched} or {None}) == {expected}


def test_compare_deltas_and_flags():
  rows = [
      {"model": "dino_rn50", "dataset": "imagenet", "split": "validation",
       "protocol": "linear", "metric": "top1", "value": "74.8", "n_examples": "50000"},
      {"model": "byol_rn50", "dataset": "imagenet", "split": "validation",
       "protocol": "linear", "metric": "top1", "value": "70.0", "n_examples": "50000"},
      {"model": "mae_vitb16", "dataset": "imagenet", "split": "validation",
       "protocol": "linear", "metric": "top1", "value": "68.0", "n_examples": "50000"},
  ]
  out = baselines.compare(table_lib.table_from_rows(rows))
  by = {(r["model"], r["protocol"]): r for r in out}
  assert set(by) == {("dino_rn50", "linear"), ("dino_rn50", "knn"), ("byol_rn50", "linear")}
  assert by[("dino_rn50", "linear")]["delta"] == pytest.approx(74.8 - 75.3)
  assert by[("dino_rn50", "linear")]["verified"] is True
  assert math.isnan(by[("dino_rn50", "knn")]["ours"])  # no kNN run of ours
  assert by[("byol_rn50", "linear")]["verified"] is False
  assert "NOT verified" in by[("byol_rn50", "linear")]["source"]
  assert "unofficial" in by[("byol_rn50", "linear")]["note"]


def test_protocol_normalisation():
  assert baselines.normalize_protocol("linear (ImageNet-1k val; frozen backbone)") == "linear"
  assert baselines.normalize_protocol("k-NN (ImageNet-1k val)") == "knn"
  assert baselines.normalize_protocol("supervised end-to-end") == "supervised end-to-end"
