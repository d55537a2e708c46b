"""Published baselines: package data, verified flags, model matching, deltas."""

import csv
import math
import os

import pytest

from conftest import SHARED
from sslbench_jax.analysis import baselines
from sslbench_jax.analysis import names
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
  assert baselines.normalize_protocol("supervised end-to-end") == "classify"


def _published_rows():
  path = SHARED_CSV if os.path.exists(SHARED_CSV) else None
  return baselines.load_baselines(path)


# Framework part of each published row -> the method key names.py must give.
_FRAMEWORKS = {"DINO": "dino", "SwAV": "swav", "DeepCluster-v2": "deepcluster_v2",
               "SeLa-v2": "sela_v2", "MoCo v1": "moco_v1", "MoCo v2": "moco_v2",
               "SimCLR v1": "simclr", "SimCLR v2": "simclr_v2", "PCL v1": "pcl_v1",
               "PCL v2": "pcl_v2", "BYOL": "byol", "SimSiam": "simsiam", "OBoW": "obow",
               "Barlow Twins": "barlowtwins", "VICReg": "vicreg",
               "Supervised": "supervised"}


def test_every_published_framework_is_recognised_and_matched():
  rows = _published_rows()
  frameworks = {b.method.split(" (")[0] for b in rows}
  assert frameworks == set(_FRAMEWORKS)  # the table's frameworks, written out
  for b in rows:
    fw = b.method.split(" (")[0]
    key = _FRAMEWORKS[fw]
    assert baselines.framework_of(b.method) == key, b.method
    assert (key, "ResNet") in baselines.MODEL_TO_BASELINE, key
    # Typical model names of that framework's ResNet-50 get one of its rows.
    compact = fw.lower().replace(" ", "_").replace("-", "_")
    for model in (f"{compact}_rn50", f"{compact}_resnet50", f"{fw} ResNet-50",
                  f"{key}_r50"):
      assert names.parse_model_name(model).method == key, model
      matched, _ = baselines.baselines_for_model(model, rows)
      assert matched and {baselines.framework_of(m.method) for m in matched} == {key}, model


@pytest.mark.parametrize("model,expected", [
    ("moco_v2_200ep_rn50", "MoCo v2 (200ep)"),       # epochs pick the release
    ("moco_v2_800ep_rn50", "MoCo v2 (800ep)"),
    ("swav_400ep_rn50", "SwAV (800ep; bs4096; 2x224+6x96)"),  # 2 releases of 400ep: default
    ("pcl_v1_rn50", "PCL v1 (200ep)"),
    ("PCL v2", "PCL v2 (200ep)"),
    ("pcl_rn50", None),                              # v1 or v2: not guessed
    ("moco_rn50", None),
    ("obow_resnet50", "OBoW (200ep; bs256)"),
    ("vicreg_rn50", "VICReg (1000ep)"),
    ("vicregl_rn50", None),                          # a different method
    ("simclr_v2_r50_1x_sk0", "SimCLR v2 (r50_1x_sk0)"),
    ("simclr_v2_r50_1x_sk1", None),                  # selective kernels: another network
    ("mocov1_rn50", "MoCo v1 (200ep)"),
    ("supervised_rn50", "Supervised (torchvision v1 weights; reference)"),
])
def test_new_framework_matching(model, expected):
  matched, _ = baselines.baselines_for_model(model, baselines.load_baselines())
  assert ({b.method for b in matched} or {None}) == {expected}


def test_supervised_baseline_compares_the_classify_protocol():
  rows = [{"model": "supervised_rn50", "dataset": "imagenet", "split": "validation",
           "protocol": "classify", "metric": "top1", "value": "76.0",
           "n_examples": "50000"}]
  out = baselines.compare(table_lib.table_from_rows(rows))
  assert len(out) == 1 and out[0]["protocol"] == "classify"
  assert out[0]["delta"] == pytest.approx(76.0 - 76.156)


def test_released_head_is_compared_with_the_published_linear_number():
  rows = [{"model": "dino_rn50", "dataset": "imagenet", "split": "validation",
           "protocol": p, "metric": "top1", "value": v, "n_examples": "50000"}
          for p, v in (("linear", "74.0"), ("released_head", "75.2"))]
  out = {r["protocol"]: r for r in baselines.compare(table_lib.table_from_rows(rows))}
  assert set(out) == {"linear", "released_head", "knn"}
  assert out["released_head"]["published"] == 75.3
  assert out["released_head"]["delta"] == pytest.approx(75.2 - 75.3)
  assert out["linear"]["delta"] == pytest.approx(74.0 - 75.3)
