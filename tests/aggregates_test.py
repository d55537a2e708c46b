"""Aggregates, ranks and rank changes on small hand-computed tables."""

import json

import numpy as np
import pytest

from sslbench_jax.analysis import aggregates
from sslbench_jax.analysis import correlations
from sslbench_jax.analysis import names
from sslbench_jax.analysis import table as table_lib


def _rows(cells, protocol="linear", hparams="{}"):
  """cells: {(model, dataset): (value, n)}"""
  return [{"model": m, "dataset": d, "split": "validation", "protocol": protocol,
           "hparams": hparams, "metric": "top1", "value": str(v), "n_examples": str(n)}
          for (m, d), (v, n) in cells.items()]


def test_aggregate_matrix_by_hand():
  v = np.array([[80.0, 40.0, 60.0],
                [70.0, 40.0, np.nan],
                [90.0, 20.0, 60.0]])
  n = np.array([[100, 300, 600]] * 3, float)
  agg = aggregates.aggregate_matrix(v, n)
  np.testing.assert_allclose(agg["mean"], [60.0, 55.0, 170 / 3])
  # Weighted: (80*100 + 40*300 + 60*600) / 1000 = 56; b: (7000+12000)/400; c: (9000+6000+36000)/1000.
  np.testing.assert_allclose(agg["weighted_mean"], [56.0, 47.5, 51.0])
  np.testing.assert_allclose(agg["geometric_mean"],
                             [(80 * 40 * 60) ** (1 / 3), np.sqrt(70 * 40),
                              (90 * 20 * 60) ** (1 / 3)])
  # Ranks (1 = best): d1: c=1, a=2, b=3; d2: a,b tie 1.5, c=3; d3: a,c tie 1.5.
  np.testing.assert_allclose(agg["ranks"], [[2, 1.5, 1.5], [3, 1.5, np.nan], [1, 3, 1.5]])
  np.testing.assert_allclose(agg["mean_rank"], [5 / 3, 2.25, 5.5 / 3])
  np.testing.assert_array_equal(agg["n_datasets"], [3, 2, 3])


def test_geometric_mean_with_zero_accuracy():
  agg = aggregates.aggregate_matrix(np.array([[0.0, 50.0]]), np.ones((1, 2)))
  assert agg["geometric_mean"][0] == 0.0


def test_aggregates_table_excludes_variants_and_splits_bn_protocol():
  cells = {("a", "imagenet"): (80, 50000), ("a", "cub"): (60, 5794),
           ("a", "imagenet_r"): (30, 30000),
           ("b", "imagenet2012"): (70, 50000), ("b", "CUB-200"): (65, 5794),
           ("b", "imagenet_r"): (35, 30000)}
  rows = _rows(cells) + _rows({("a", "imagenet"): (82, 50000)}, hparams='{"final_batch_norm": true}')
  t = table_lib.table_from_rows(rows)
  assert t.protocols == ["linear", "linear+bn"]
  assert t.benchmark_datasets == ["imagenet", "cub"]
  out = {(r["model"], r["protocol"]): r for r in aggregates.aggregates(t)
         if r["suite"] == "benchmark"}
  assert out[("a", "linear")]["mean"] == pytest.approx(70.0)
  assert out[("a", "linear")]["weighted_mean"] == pytest.approx(
      (80 * 50000 + 60 * 5794) / 55794)
  assert out[("b", "linear")]["mean_rank"] == pytest.approx(1.5)  # 2nd, 1st
  assert out[("a", "linear+bn")]["n_datasets"] == 1
  assert ("b", "linear+bn") not in out


def test_rank_changes_by_hand():
  val = {"a": 80, "b": 75, "c": 70, "d": 60}
  real = {"a": 85, "b": 86, "c": 80, "d": 70}
  sketch = {"a": 20, "b": 30, "c": 30}  # d missing: ranked among 3
  cells = {(m, "imagenet"): (v, 50000) for m, v in val.items()}
  cells.update({(m, "imagenet_real"): (v, 46837) for m, v in real.items()})
  cells.update({(m, "imagenet_sketch"): (v, 50889) for m, v in sketch.items()})
  t = table_lib.table_from_rows(_rows(cells))
  rows = {(r["model"], r["variant"]): r for r in aggregates.rank_changes(t)}
  assert rows[("a", "imagenet_real")]["rank_change"] == 1.0   # 1 -> 2
  assert rows[("b", "imagenet_real")]["rank_change"] == -1.0  # 2 -> 1
  assert rows[("d", "imagenet_real")]["rank_change"] == 0.0
  # Sketch: b and c tie for first (1.5 each); a falls to 3.
  assert rows[("a", "imagenet_sketch")]["rank_change"] == 2.0
  assert rows[("b", "imagenet_sketch")]["rank_change"] == -0.5
  assert rows[("c", "imagenet_sketch")]["rank_change"] == -1.5
  assert rows[("c", "imagenet_sketch")]["n_models"] == 3
  assert ("d", "imagenet_sketch") not in rows


def test_seeds_averaged_and_missing_metric_error():
  cells = _rows({("a", "imagenet"): (80, 100)}) + _rows({("a", "imagenet"): (82, 100)})
  t = table_lib.table_from_rows(cells)
  assert t.values[("a", "linear", "imagenet")] == pytest.approx(81.0)
  with pytest.raises(ValueError, match="no rows with metric 'top5'"):
    table_lib.table_from_rows(cells, metric="top5")


def test_load_results_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    table_lib.load_results(str(tmp_path / "x.csv"))
  bad = tmp_path / "bad.csv"
  bad.write_text("model,dataset\nm,imagenet\n")
  with pytest.raises(ValueError, match="lacks columns"):
    table_lib.load_results(str(bad))


@pytest.mark.parametrize("name,split,expected", [
    ("imagenet2012", "validation", "imagenet"),
    ("ImageNet-1k (ILSVRC2012)", "val", "imagenet"),
    ("imagenet2012_real", "validation", "imagenet_real"),
    ("imagenet2012", "real", "imagenet_real"),
    ("imagenet_v2/matched-frequency", "test", "imagenet_v2"),
    ("imagenet_v2", "test", "imagenet_v2"),
    ("imagenet_v2/threshold-0.7", "test", "imagenet_v2_threshold"),
    ("imagenet_v2_threshold", "test", "imagenet_v2_threshold"),
    ("imagenet_v2/topimages", "test", "imagenet_v2_top"),
    ("imagenet_v2_top", "test", "imagenet_v2_top"),
    ("imagenet_v2_unknown_version", "test", "imagenet_v2_unknown_version"),
    ("imagenet_r", "test", "imagenet_r"),
    ("imagenet-a", "test", "imagenet_a"),
    ("imagenet_sketch", "test", "imagenet_sketch"),
    ("imagenet_d_sketch", "test", "imagenet_d_sketch"),
    ("DomainNet-clipart", "test", "imagenet_d_clipart"),
    ("inaturalist", "2021_valid", "inaturalist"),
    ("CUB-200-2011", "test", "cub"),
    ("Pascal VOC 2012", "val", "pascal"),
    ("cifar100", "test", "cifar100"),
    ("food101", "test", "food101"),
])
def test_canonical_dataset(name, split, expected):
  assert names.canonical_dataset(name, split) == expected


@pytest.mark.parametrize("name,method,backbone,family", [
    ("dino_resnet50", "dino", "ResNet", "discriminative"),
    ("dino_vitb16", "dino", "ViT", "discriminative"),
    ("DINO ViT-B/16", "dino", "ViT", "discriminative"),
    ("MoCo v2 (800ep)", "moco_v2", "ResNet", "discriminative"),
    ("moco_v3", "moco_v3", "unknown", "discriminative"),
    ("siamsiam_rn50", "simsiam", "ResNet", "discriminative"),
    ("NPID++", "npid_plusplus", "ResNet", "discriminative"),
    ("npid_plusplus_rn50", "npid_plusplus", "ResNet", "discriminative"),
    ("beit_v2_vitb16", "beit_v2", "ViT", "generative"),
    ("mae", "mae", "ViT", "generative"),
    ("my_new_model_vit_base", None, "ViT", "unknown"),
    ("resnet50_supervised", "supervised", "ResNet", "supervised"),
    ("resnet50_random_init", None, "ResNet", "unknown"),
    ("PCL v2 (200ep)", "pcl_v2", "ResNet", "discriminative"),
    ("obow_rn50", "obow", "ResNet", "discriminative"),
    ("VICReg", "vicreg", "ResNet", "discriminative"),
    ("moco_v1_resnet50", "moco_v1", "ResNet", "discriminative"),
    ("simclr_v2_r50_1x_sk0", "simclr_v2", "ResNet", "discriminative"),
])
def test_parse_model_name(name, method, backbone, family):
  info = names.parse_model_name(name)
  assert (info.method, info.backbone, info.method_family) == (method, backbone, family)


def test_protocol_label():
  assert names.protocol_label("linear", '{"final_batch_norm": true}') == "linear+bn"
  assert names.protocol_label("linear", {"final_batch_norm": False}) == "linear"
  assert names.protocol_label("knn", "") == "knn"
  with pytest.raises(ValueError, match="not JSON"):
    names.protocol_label("linear", "{oops")


def _study_rows(values):
  """Rows as configs/closer_look.py's run stores them (tests/closer_look_smoke_test.py):
  entries knn, knn_norm, linear (batchnorm false), linear_bn (batchnorm true).

  values: {(model, entry): top1}
  """
  common = {"representation": "pre_logits", "train_dataset": "cifar100",
            "train_split": "train", "preprocessing": "smoke_32", "features_dtype": "float32"}
  hp = {"knn": dict(k=20, metric="euclidean", zscore=False, bank_dtype="float32",
                    protocol_type="knn"),
        "knn_norm": dict(k=20, metric="euclidean", zscore=True, bank_dtype="float32",
                         protocol_type="knn"),
        "linear": dict(source="pre_logits", lr=0.4, weight_decay=0.0, batchnorm=False,
                       optimizer="sgd", epochs=100, batch_size=1024, warmup_epochs=5,
                       clip_norm=0.5, grid_size=1, selection="holdout", holdout=0.1,
                       protocol_type="linear"),
        "linear_bn": dict(source="pre_logits", lr=0.4, weight_decay=0.0, batchnorm=True,
                          optimizer="sgd", epochs=100, batch_size=1024, warmup_epochs=5,
                          clip_norm=0.5, grid_size=1, selection="holdout", holdout=0.1,
                          protocol_type="linear")}
  rows = []
  for (model, entry), v in values.items():
    for metric, value in (("top1", v), ("top5", min(100.0, v + 20))):
      rows.append({"model": model, "dataset": "cifar100", "split": "test",
                   "protocol": entry, "hparams": json.dumps({**common, **hp[entry]}),
                   "metric": metric, "value": str(value), "n_examples": "16"})
  return rows


def test_study_config_linear_bn_pairs_with_linear():
  models = ["simclr", "moco_v2", "moco_v3_vitb16", "mae"]
  rng = np.random.default_rng(0)
  values = {}
  for m in models:
    for entry in ("knn", "knn_norm", "linear", "linear_bn"):
      values[(m, entry)] = float(np.round(rng.uniform(20, 80), 2))
  t = table_lib.table_from_rows(_study_rows(values))
  assert t.protocols == ["knn", "knn_norm", "linear", "linear+bn"]
  rows = correlations.bn_effect_table(t, n_boot=200, n_perm=200, seed=0)
  # Groups: all models, ResNet (simclr, moco_v2), ViT (moco_v3_vitb16, mae).
  by_group = {(r["dataset"], r["group"]): r for r in rows}
  assert set(by_group) == {(d, g) for d in ("cifar100", "mean_ood")
                           for g in ("all", "ResNet", "ViT")}
  diff = np.array([values[(m, "linear_bn")] - values[(m, "linear")] for m in models])
  r = by_group[("cifar100", "all")]
  assert r["protocol"] == "linear" and r["n_models"] == 4
  assert r["mean_diff"] == pytest.approx(diff.mean(), abs=1e-12)
  assert r["n_improved"] == int(np.sum(diff > 0))
  assert by_group[("cifar100", "ViT")]["mean_diff"] == pytest.approx(diff[2:].mean())
  # Every sign pattern of 4 differences is one of 16: the sign-flip p-value
  # converges to the exact one (share of patterns with |mean| >= observed).
  signs = np.array(np.meshgrid(*[[-1, 1]] * 4)).reshape(4, -1).T
  exact = np.mean(np.abs((signs * diff).mean(axis=1)) >= abs(diff.mean()) - 1e-12)
  assert r["p_value"] == pytest.approx(exact, abs=0.08)


def test_bn_selected_in_a_sweep_is_not_a_separate_protocol():
  # The demo's linear entry sweeps batchnorm=[false, true]: one row per
  # (model, dataset), BN on for some models. Still one protocol.
  rows = []
  for m, bn, v in (("a", True, 80), ("b", False, 70), ("c", True, 60)):
    rows += _rows({(m, "digits"): (v, 360)}, hparams=json.dumps({"batchnorm": bn}))
  t = table_lib.table_from_rows(rows)
  assert t.protocols == ["linear"] and len(t.models) == 3
  assert table_lib.bn_selected_protocols(rows) == {"linear"}


@pytest.mark.parametrize("name,hparams,expected", [
    ("linear_bn", {"batchnorm": True}, "linear+bn"),
    ("linear-BN", {"batchnorm": True}, "linear+bn"),
    ("linear+bn", {"batchnorm": True}, "linear+bn"),
    ("linear_batchnorm", {"batchnorm": True}, "linear+bn"),
    ("linear", {"batchnorm": True}, "linear+bn"),
    ("linear", {"batchnorm": False}, "linear"),
    ("knn_norm", {"zscore": True}, "knn_norm"),
])
def test_protocol_label_drops_bn_marker(name, hparams, expected):
  """The BN label of a fixed setting; a searched one (bn_selected, or a
  batchnorm_grid with both settings in the row) keeps the name."""
  assert names.protocol_label(name, hparams) == expected
  assert names.protocol_label(name, hparams, bn_selected=True) == name


def test_batchnorm_grid_in_the_row_marks_bn_as_selected():
  assert names.protocol_label("linear", {"batchnorm": True,
                                         "batchnorm_grid": [False, True]}) == "linear"
  assert names.protocol_label("linear", {"batchnorm": True,
                                         "batchnorm_grid": ["false", "true"]}) == "linear"
  assert names.protocol_label("linear_bn", {"batchnorm": True,
                                            "batchnorm_grid": [True]}) == "linear+bn"
  # One model, BN selected: no cross-model evidence, but the grid says so.
  rows = _rows({("a", "digits"): (80, 360)},
               hparams=json.dumps({"batchnorm": True, "batchnorm_grid": [False, True]}))
  assert table_lib.table_from_rows(rows).protocols == ["linear"]
