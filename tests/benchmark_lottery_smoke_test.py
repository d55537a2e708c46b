"""configs/benchmark_lottery.py end to end, offline, on a representative subset.

Four of the study's 12 frameworks, one per release format and head source,
as checkpoint FILES named and laid out as ``RELEASES`` says (random weights at
full ResNet-50 size, which the config fixes): DINO (PyTorch zip backbone +
its separate ``dino_resnet50_linearweights.pth``, DDP ``module.linear`` under
``state_dict``), BYOL (the official dill/Haiku pickle, whose online
``classifier`` is the released head), SimCLR v2 (a TensorFlow bundle with
TF1 names and its ``head_supervised`` head; ``no_norm`` preprocessing) and
MoCo v2 (PyTorch zip, no head). ImageNet-1k train / val and the variants (v2,
R, Sketch, A, and ReaL cut out of val) come from ``tfds.testing.mock_data``
with distinct examples per builder and split; labels are 4 classes in both
200-class subsets so every test set's primary metric is defined. Only the
dataset preprocessing (``smoke_32``) and the extraction batch are shrunk; protocols and their
hyper-parameters are the config's. The run goes through ``evaluate.run``; the
``imagenet_variants`` aggregates of ``report/aggregates.csv`` are then
recomputed with NumPy/SciPy from ``results.jsonl``, and the released heads'
rows from the saved features and the head tensors as written.
"""

import csv
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from scipy import stats as sp_stats
import tensorflow_datasets as tfds
import torch

from sslbench_jax import evaluate
from sslbench_jax.analysis import names
from sslbench_jax.backbones import weights
from sslbench_jax.data import label_spaces
from sslbench_jax.data import registry as data_registry
from sslbench_jax.features import io
import convert_byol_test
import convert_simclr_test
import torch_resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODELS = ("dino_rn50", "byol_rn50", "simclr_v2_rn50", "moco_v2_800ep_rn50")
_N_TRAIN, _N_TEST = 24, 10
# Classes in both the ImageNet-R and ImageNet-A subsets: every label is scorable.
_CLASSES = sorted(set(label_spaces.imagenet_r_indices())
                  & set(label_spaces.imagenet_a_indices()))[:4]
_PRIMARY = {"imagenet1k": "top1", "imagenet_real": "real_top1", "imagenet_v2": "top1",
            "imagenet_r": "subset_top1", "imagenet_sketch": "top1", "imagenet_a": "subset_top1"}
_CANONICAL = {"imagenet1k": "imagenet", "imagenet_real": "imagenet_real",
              "imagenet_v2": "imagenet_v2", "imagenet_r": "imagenet_r",
              "imagenet_sketch": "imagenet_sketch", "imagenet_a": "imagenet_a"}


def _config_module():
  spec = importlib.util.spec_from_file_location(
      "benchmark_lottery", os.path.join(ROOT, "configs", "benchmark_lottery.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# --- checkpoints, in each release's format -----------------------------------

def _rn50(seed):
  return torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed)


def _linear(classes, dim, seed):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(classes, dim, generator=g) * 0.05, torch.randn(classes, generator=g)


def _write_dino(ckpt_dir, r):
  torch.save(_rn50(1).state_dict(), os.path.join(ckpt_dir, r["file"]))
  w, b = _linear(1000, 2048, seed=2)
  torch.save({"epoch": 100, "state_dict": {"module.linear.weight": w,
                                           "module.linear.bias": b}},
             os.path.join(ckpt_dir, r["head"]))
  return w.numpy(), b.numpy()


def _write_byol(ckpt_dir, r):
  rs = np.random.RandomState(3)
  trees = []
  for seed in (4, 5):
    params, state = convert_byol_test._haiku_trees(_rn50(seed))  # pylint: disable=protected-access
    params["classifier"] = {"w": (rs.randn(2048, 1000) * 0.05).astype(np.float32),
                            "b": rs.randn(1000).astype(np.float32)}
    trees.append((params, state))
  convert_byol_test._write_experiment_state(os.path.join(ckpt_dir, r["file"]), *trees)  # pylint: disable=protected-access
  return trees[0][0]["classifier"]["w"].T, trees[0][0]["classifier"]["b"]


def _write_simclr(ckpt_dir, r):
  tensors = convert_simclr_test.simclr_v1_tensors(_rn50(6))  # TF1 names, as v2's r50_1x_sk0
  rs = np.random.RandomState(7)
  kernel = (rs.randn(2048, 1000) * 0.05).astype(np.float32)
  bias = rs.randn(1000).astype(np.float32)
  tensors["head_supervised/linear_layer/dense/kernel"] = kernel
  tensors["head_supervised/linear_layer/dense/bias"] = bias
  prefix = os.path.join(ckpt_dir, r["file"][:-len(".index")])
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  convert_simclr_test.write_bundle(prefix, tensors)
  return kernel.T, bias


def _write_moco(ckpt_dir, r):
  q = {"module.encoder_q." + k: v for k, v in _rn50(8).state_dict().items()}
  k = {"module.encoder_k." + k: v for k, v in _rn50(9).state_dict().items()}
  g = torch.Generator().manual_seed(10)
  state = {**q, **k, "module.encoder_q.fc.0.weight": torch.randn(2048, 2048, generator=g),
           "module.encoder_q.fc.0.bias": torch.zeros(2048),
           "module.encoder_q.fc.2.weight": torch.randn(128, 2048, generator=g),
           "module.encoder_q.fc.2.bias": torch.zeros(128),
           "module.queue": torch.randn(128, 64, generator=g),
           "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
  torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state}, os.path.join(
      ckpt_dir, r["file"]))
  return None


_WRITERS = {"dino_rn50": _write_dino, "byol_rn50": _write_byol,
            "simclr_v2_rn50": _write_simclr, "moco_v2_800ep_rn50": _write_moco}


# --- mocked ImageNet and variants ----------------------------------------------

def _images(rs, labels):
  base = np.random.RandomState(99).randint(0, 256, (len(_CLASSES), 1, 1, 3))
  index = {c: i for i, c in enumerate(_CLASSES)}
  rows = np.array([index[int(l)] for l in labels])
  return np.clip(base[rows] + rs.randint(-50, 50, (len(labels), 40, 48, 3)), 0, 255
                 ).astype(np.uint8)


def _val_files(n):
  """ILSVRC2012 val files of the chosen classes with a non-empty ReaL set."""
  real = label_spaces.real_labels()
  val = data_registry._val_file_labels()  # pylint: disable=protected-access
  out = []
  for name in sorted(val):
    if val[name] in _CLASSES and real[int(name[15:23]) - 1]:
      out.append((name, val[name]))
      if len(out) == n:
        return out
  raise AssertionError("not enough val files")


def _data():
  rs = np.random.RandomState(0)

  def split(prefix, n):
    labels = rs.choice(_CLASSES, n)
    return [{"image": im, "label": int(l), "file_name": f"{prefix}_{j:03d}.JPEG"}
            for j, (im, l) in enumerate(zip(_images(rs, labels), labels))]

  val = _val_files(_N_TEST)
  val_images = _images(rs, [l for _, l in val])
  data = {("imagenet2012", "train"): split("train", _N_TRAIN),
          ("imagenet2012", "validation"): [
              {"image": im, "label": int(l), "file_name": name}
              for (name, l), im in zip(val, val_images)]}
  for builder in ("imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a"):
    data[builder, "test"] = split(builder, _N_TEST)
  return data


@pytest.fixture(scope="module")
def lottery_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lottery")
  ckpt_dir = str(root / "ckpt")
  os.makedirs(ckpt_dir)
  module = _config_module()
  heads = {m: _WRITERS[m](ckpt_dir, module.RELEASES[m]) for m in _MODELS}
  config = module.get_config(f"checkpoints={ckpt_dir},data_dir={root / 'tfds'},"
                             f"models={'+'.join(_MODELS)}")
  for d in config.datasets.values():
    d.preprocessing = "smoke_32"
  config.analysis.n_boot = config.analysis.n_perm = 50
  # The config's 128 per device would pad these 10-24 images to 128 per step.
  config.extraction.batch_size_per_device = 16
  data = _data()

  def as_data_source(builder, split, **kwargs):
    del kwargs
    return data[builder.name, split]

  workdir = str(root / "work")
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    summary = evaluate.run(config, workdir)
  with open(os.path.join(workdir, "results.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  with open(os.path.join(workdir, "report", "aggregates.csv")) as f:
    aggregates = list(csv.DictReader(f))
  yield dict(config=config, workdir=workdir, rows=rows, aggregates=aggregates,
             heads=heads, summary=summary, ckpt_dir=ckpt_dir, module=module)
  shutil.rmtree(root, ignore_errors=True)  # ~1.5 GB of checkpoints and weights


def test_full_config_is_valid_and_names_the_12_frameworks():
  module = _config_module()
  config = module.get_config("checkpoints=/ckpt,data_dir=/tfds")
  evaluate.validate(config)
  assert len(config.models) == 12 and len(module.RELEASES) == 12
  assert sorted(config.datasets) == ["imagenet", "imagenet_a", "imagenet_r", "imagenet_real",
                                     "imagenet_sketch", "imagenet_v2"]
  assert sorted(config.protocols) == ["linear", "linear_bn", "released_head"]
  formats = {r["format"] for r in module.RELEASES.values()}
  assert formats == {"torch_zip", "haiku_pickle", "tf_bundle"}
  with_head = {m for m, r in module.RELEASES.items() if r["head"]}
  assert with_head == {"swav_800ep_rn50", "simclr_v2_rn50", "byol_rn50", "simsiam_100ep_rn50",
                       "dino_rn50"}
  for m, spec in config.models.items():
    assert (spec.protocols is None) == (m in with_head), m
  assert config.models.simclr_v2_rn50.preprocessing == "no_norm"
  no_heads = module.get_config("checkpoints=/c,heads=false")
  assert "released_head" not in no_heads.protocols
  assert all(m.head is None for m in no_heads.models.values())


def test_every_step_ran_with_provenance(lottery_run):
  config, rows = lottery_run["config"], lottery_run["rows"]
  primary = {(r["model"], r["protocol"], r["dataset"]) for r in rows
             if r["metric"] == _PRIMARY[r["dataset"]]}
  expected = set()
  for m, spec in config.models.items():
    for p in spec.protocols or list(config.protocols):
      expected |= {(m, p, _splits_test(config, d)) for d in config.protocols[p].datasets}
  assert primary == expected
  assert {m for m, p, _ in primary if p == "released_head"} == {
      "dino_rn50", "byol_rn50", "simclr_v2_rn50"}
  for r in rows:
    if r["protocol"] == "released_head":
      sha = weights.load_variables(os.path.join(
          lottery_run["workdir"], "weights", f"{r['model']}.npz"))[1]["released_head"]
      assert _hp(r)["head_sha256"] == sha["source_sha256"]
  dino_head = os.path.join(lottery_run["ckpt_dir"],
                           lottery_run["module"].RELEASES["dino_rn50"]["head"])
  assert {_hp(r)["head_sha256"] for r in rows if r["model"] == "dino_rn50"
          and r["protocol"] == "released_head"} == {weights.sha256_file(dino_head)}


def _hp(row):
  return json.loads(row["hparams"]) if isinstance(row["hparams"], str) else row["hparams"]


def _splits_test(config, entry):
  d = config.datasets[entry]
  return d.get("test_dataset") or d.dataset


def test_simclr_features_use_its_own_preprocessing(lottery_run):
  feats = os.listdir(os.path.join(lottery_run["workdir"], "features"))
  simclr = [f for f in feats if f.startswith("simclr_v2_rn50__")]
  assert simclr and all("__no_norm__" in f for f in simclr), simclr
  assert not any("__no_norm__" in f for f in feats if not f.startswith("simclr_v2_rn50__"))
  meta = io.load(os.path.join(lottery_run["workdir"], "features", simclr[0])).meta
  assert meta["preprocessing"] == "no_norm"


@pytest.mark.parametrize("model", ["dino_rn50", "byol_rn50", "simclr_v2_rn50"])
def test_released_head_rows_equal_numpy_on_the_saved_features(lottery_run, model):
  workdir, rows = lottery_run["workdir"], lottery_run["rows"]
  w, b = lottery_run["heads"][model]  # (1000, 2048), as written in the release
  suffix = "__no_norm" if model == "simclr_v2_rn50" else ""
  checked = 0
  for entry, dataset, split in (("imagenet", "imagenet1k", "validation"),
                                ("imagenet_sketch", "imagenet_sketch", "test")):
    stem = (f"{entry}__{split}" if dataset == "imagenet1k"
            else f"{entry}__{dataset}__{split}")
    fs = io.load(os.path.join(workdir, "features", f"{model}__{stem}{suffix}__pre_logits.npz"))
    logits = fs.features.astype(np.float64) @ np.asarray(w, np.float64).T + b
    expected = 100.0 * np.mean(logits.argmax(1) == fs.labels)
    got = [r["value"] for r in rows if r["model"] == model and r["dataset"] == dataset
           and r["protocol"] == "released_head" and r["metric"] == "top1"]
    assert got == [pytest.approx(expected, abs=1e-9)], (model, entry)
    checked += 1
  assert checked == 2


def test_imagenet_variants_aggregates_match_numpy_scipy(lottery_run):
  rows, aggregates = lottery_run["rows"], lottery_run["aggregates"]
  suite = [a for a in aggregates if a["suite"] == "imagenet_variants"]
  datasets = list(_PRIMARY)
  by_protocol = {}
  for r in rows:
    if r["metric"] == _PRIMARY[r["dataset"]]:
      # The analysis labels the BatchNorm entry "linear+bn" (pairs it with "linear").
      label = names.protocol_label(r["protocol"], r["hparams"])
      by_protocol.setdefault(label, {})[r["model"], r["dataset"]] = (
          r["value"], r["n_examples"])
  assert sorted({a["protocol"] for a in suite}) == sorted(by_protocol) == [
      "linear", "linear+bn", "released_head"]
  assert len(suite) == sum(len({m for m, _ in cells}) for cells in by_protocol.values())
  for protocol, cells in by_protocol.items():
    models = sorted({m for m, _ in cells})
    values = np.array([[cells[m, d][0] for d in datasets] for m in models])
    sizes = np.array([[cells[m, d][1] for d in datasets] for m in models], np.float64)
    ranks = np.stack([sp_stats.rankdata(-values[:, j]) for j in range(len(datasets))], 1)
    for i, m in enumerate(models):
      (got,) = [a for a in suite if a["model"] == m and a["protocol"] == protocol]
      assert int(got["n_datasets"]) == 6
      v = values[i]
      assert float(got["mean"]) == pytest.approx(np.mean(v), abs=1e-9)
      assert float(got["weighted_mean"]) == pytest.approx(
          np.average(v, weights=sizes[i]), abs=1e-9)
      geo = 0.0 if (v == 0).any() else sp_stats.gmean(v)
      assert float(got["geometric_mean"]) == pytest.approx(geo, abs=1e-9)
      assert float(got["mean_rank"]) == pytest.approx(ranks[i].mean(), abs=1e-9)
  # ReaL is scored on its own images: val files with a non-empty ReaL set.
  sizes = {r["dataset"]: r["n_examples"] for r in rows}
  assert sizes["imagenet_real"] == sizes["imagenet1k"] == _N_TEST
  report = os.path.join(lottery_run["workdir"], "report", "report.md")
  with open(report) as f:
    assert "lottery" in f.read().lower()
