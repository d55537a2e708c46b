"""configs/closer_look.py end to end, offline, on a tiny but honest subset.

Four of the study's models as checkpoint FILES named as in
``closer_look.MODELS`` and laid out as each release is (random weights at full
size: ResNet-50 and ViT-B/16, which the config fixes): SimCLR from VISSL
(``.torch``, trunk under ``classy_state_dict``), MoCo v2 (``.pth.tar``,
``state_dict.module.encoder_q.`` plus key encoder and queue), MoCo v3 ViT-B
(base + momentum encoders; the config selects the momentum one) and MAE ViT-B
(``{"model": encoder}``). One of the study's datasets (CIFAR-100, its registry
TFDS entry) comes from ``tfds.testing.mock_data``, fed distinct train / test
examples (the default mock repeats the same examples in every split). Only the
preprocessing (``smoke_32``) and the extraction batch are shrunk; models, protocols and their
hyper-parameters are the study's. The run goes through ``evaluate.run``, the
job's entry point, then is checked against the config's promises and against
scikit-learn on the features the run saved.
"""

import hashlib
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
import tensorflow_datasets as tfds
import torch

from sslbench_jax import evaluate
from sslbench_jax.backbones import registry
from sslbench_jax.backbones import weights
from sslbench_jax.features import io
import torch_resnet
import torch_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODELS = ("simclr", "moco_v2", "moco_v3_vitb16", "mae")
# One dataset keeps the run under ~60 s on one core (each extra dataset costs
# ~35 s: 4 models x 2 extractions and 4 linear probes, each compiled anew).
_DATASETS = ("cifar100",)
_N = {"train": 40, "test": 16}  # per split; kNN k = 20 needs >= 20 train examples
_NUM_CLASSES = 4  # labels drawn from the first few classes, so kNN has neighbours


def _closer_look():
  spec = importlib.util.spec_from_file_location(
      "closer_look", os.path.join(ROOT, "configs", "closer_look.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# --- checkpoints, in each release's layout ----------------------------------

def _resnet50_state(seed, prefix):
  model = torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed)
  return {prefix + k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _vit_b(seed):
  m = registry.create_model("vit_base_patch16")
  vit = torch_vit.VisionTransformer(patch_size=m.patch_size, width=m.width, depth=m.depth,
                                    num_heads=m.num_heads).randomize_(seed)
  return {k: v.detach().clone() for k, v in vit.state_dict().items()}


def _junk(*shape, seed=0):
  return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _simclr_vissl():
  trunk = _resnet50_state(1, "_feature_blocks.")
  heads = {"0.clf.0.weight": _junk(128, 2048), "0.clf.0.bias": _junk(128)}
  return {"phase_idx": 999, "classy_state_dict": {"base_model": {"model": {
      "trunk": trunk, "heads": heads}}}}


def _moco_v2():
  state = {**_resnet50_state(2, "module.encoder_q."), **_resnet50_state(3, "module.encoder_k."),
           "module.encoder_q.fc.0.weight": _junk(2048, 2048),
           "module.encoder_q.fc.2.weight": _junk(128, 2048),
           "module.queue": _junk(128, 64), "module.queue_ptr": torch.zeros(1)}
  return {"epoch": 800, "arch": "resnet50", "state_dict": state,
          "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]}}


def _moco_v3_vit():
  head = {"head.0.weight": _junk(256, 768), "head.1.weight": _junk(256),
          "head.1.bias": _junk(256), "head.3.weight": _junk(64, 256)}
  base, momentum = _vit_b(4), _vit_b(5)
  state = {**{"module.base_encoder." + k: v for k, v in {**base, **head}.items()},
           **{"module.momentum_encoder." + k: v for k, v in {**momentum, **head}.items()},
           "module.predictor.0.weight": _junk(64, 64)}
  return {"epoch": 300, "arch": "vit_base", "state_dict": state}


def _mae():
  return {"model": _vit_b(6)}


_WRITERS = {"simclr": _simclr_vissl, "moco_v2": _moco_v2,
            "moco_v3_vitb16": _moco_v3_vit, "mae": _mae}


# --- datasets: the registry's TFDS entries, mocked with distinct splits -----

def _examples(dataset_seed):
  out = {}
  for i, (split, n) in enumerate(sorted(_N.items())):
    rs = np.random.RandomState(1000 * dataset_seed + i)
    labels = rs.randint(0, _NUM_CLASSES, n)
    # A class-dependent colour plus noise: features carry some label signal.
    base = rs.randint(0, 256, (_NUM_CLASSES, 1, 1, 3))
    images = np.clip(base[labels] + rs.randint(-60, 60, (n, 40, 48, 3)), 0, 255)
    out[split] = [{"image": images[j].astype(np.uint8), "label": int(labels[j]),
                   "id": f"{split}_{j:03d}", "image/filename": f"{split}/{j:03d}.jpg"}
                  for j in range(n)]
  return out


# TFDS builder name -> seed; "caltech_birds2011" (the study's cub) works the same way.
_TFDS_NAMES = {"cifar100": 0}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("closer_look")
  ckpt_dir = root / "ckpt"
  ckpt_dir.mkdir()
  closer_look = _closer_look()
  for name in _MODELS:
    torch.save(_WRITERS[name](), str(ckpt_dir / closer_look.MODELS[name][1]))
  config = closer_look.get_config(
      f"checkpoints={ckpt_dir},data_dir={root / 'tfds'},models={'+'.join(_MODELS)},"
      f"datasets={'+'.join(_DATASETS)}")
  for d in config.datasets.values():
    d.preprocessing = "smoke_32"
  # The config's 128 per device would pad these 40 / 16 images to 128 per step.
  config.extraction.batch_size_per_device = 16
  data = {name: _examples(seed) for name, seed in _TFDS_NAMES.items()}

  def as_data_source(builder, split, **kwargs):
    del kwargs
    return data[builder.name][split]

  workdir = str(root / "work")
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    summary = evaluate.run(config, workdir)
    rows = _rows(workdir)
    with open(os.path.join(workdir, "done.json")) as f:
      done = json.load(f)
    outputs = _mtimes(workdir, "weights") | _mtimes(workdir, "features")
    second = evaluate.run(config, workdir)
  yield dict(config=config, workdir=workdir, ckpt_dir=str(ckpt_dir), summary=summary,
             rows=rows, done=done, second=second, closer_look=closer_look,
             outputs=outputs, outputs_after=(_mtimes(workdir, "weights") |
                                             _mtimes(workdir, "features")))
  # ~3 GB of full-size checkpoints and converted weights: do not leave them in
  # the pytest base temp (kept for several sessions) on a shared machine.
  shutil.rmtree(root, ignore_errors=True)


def _mtimes(workdir, sub):
  folder = os.path.join(workdir, sub)
  return {os.path.join(sub, f): os.stat(os.path.join(folder, f)).st_mtime_ns
          for f in os.listdir(folder)}


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def test_every_promised_row_is_there_with_its_checkpoint_hash(study_run):
  config, rows = study_run["config"], study_run["rows"]
  assert sorted(config.models) == sorted(_MODELS)
  assert sorted(config.protocols) == ["knn", "knn_norm", "linear", "linear_bn"]
  top1 = {(r["model"], r["dataset"], r["protocol"]): r for r in rows if r["metric"] == "top1"}
  expected = {(m, config.datasets[d].dataset, p)
              for m in config.models for p, proto in config.protocols.items()
              for d in proto.datasets}
  assert len(expected) == 4 * 4 * len(_DATASETS) and set(top1) == expected
  shas = {m: {r["checkpoint_sha256"] for r in rows if r["model"] == m} for m in _MODELS}
  assert all(len(s) == 1 and "" not in s for s in shas.values()), shas
  assert len(set.union(*shas.values())) == len(_MODELS)
  for r in rows:
    assert 0.0 <= r["value"] <= 100.0, r
  for (m, ds, p), r in top1.items():
    hp = json.loads(r["hparams"]) if isinstance(r["hparams"], str) else r["hparams"]
    assert r["n_examples"] == _N["test"], (m, ds, p)
    assert (hp["train_dataset"], hp["train_split"]) == (ds, "train")
    if p.startswith("linear"):  # the study's recipe reached the probe unchanged
      assert (hp["lr"], hp["weight_decay"], hp["batchnorm"]) == (0.4, 0.0, p == "linear_bn")
      assert (hp["epochs"], hp["batch_size"], hp["warmup_epochs"], hp["clip_norm"]) == (
          100, 1024, 5, 0.5)
    else:
      assert (hp["k"], hp["metric"], hp["zscore"]) == (20, "euclidean", p == "knn_norm")


def test_rows_carry_the_release_checkpoint_sha256(study_run):
  closer_look = study_run["closer_look"]
  for m in _MODELS:
    sha = _sha256(os.path.join(study_run["ckpt_dir"], closer_look.MODELS[m][1]))
    assert {r["checkpoint_sha256"] for r in study_run["rows"] if r["model"] == m} == {sha}, m


def test_conversions_took_each_releases_encoder(study_run):
  workdir = study_run["workdir"]
  expected = {"simclr": ("resnet50", "vissl"), "moco_v2": ("resnet50", "moco_v1_v2"),
              "moco_v3_vitb16": ("vit_base_patch16", "moco_v3"),
              "mae": ("vit_base_patch16", None)}
  for m, (arch, source) in expected.items():
    _, meta = weights.load_variables(os.path.join(workdir, "weights", f"{m}.npz"))
    assert meta["arch"] == arch
    release = os.path.join(study_run["ckpt_dir"], study_run["closer_look"].MODELS[m][1])
    assert meta["checkpoint_sha256"] == _sha256(release)
    if source:
      assert meta["source"] == source, (m, meta["source"])
  _, meta = weights.load_variables(os.path.join(workdir, "weights", "moco_v3_vitb16.npz"))
  assert meta["prefix"] == "state_dict.module.momentum_encoder."


@pytest.mark.parametrize("protocol, zscore", [("knn", False), ("knn_norm", True)])
def test_knn_rows_match_sklearn_on_the_saved_features(study_run, protocol, zscore):
  config, workdir, rows = study_run["config"], study_run["workdir"], study_run["rows"]
  for m in _MODELS:
    for entry in _DATASETS:
      d = config.datasets[entry]
      tr = io.load(os.path.join(workdir, "features",
                                f"{m}__{entry}__{d.train_split}__pre_logits.npz"))
      te = io.load(os.path.join(workdir, "features",
                                f"{m}__{entry}__{d.test_split}__pre_logits.npz"))
      assert len(tr.labels) == _N["train"] and len(te.labels) == _N["test"]
      assert np.isfinite(tr.features).all() and tr.features.std() > 0
      xtr, xte = tr.features.astype(np.float64), te.features.astype(np.float64)
      if zscore:
        scaler = StandardScaler().fit(xtr)
        xtr, xte = scaler.transform(xtr), scaler.transform(xte)
      ref = KNeighborsClassifier(20, weights="distance").fit(xtr, tr.labels)
      expected = 100.0 * np.mean(ref.predict(xte) == te.labels)
      got = [r["value"] for r in rows if r["model"] == m and r["dataset"] == d.dataset
             and r["protocol"] == protocol and r["metric"] == "top1"]
      assert got == [pytest.approx(expected, abs=1e-9)], (m, entry)


def test_second_run_is_a_no_op(study_run):
  assert study_run["summary"]["new_rows"] == len(study_run["rows"]) > 0
  assert len(study_run["done"]) == 4 * 4 * len(_DATASETS)
  assert study_run["second"]["new_rows"] == 0
  # Nothing converted or extracted again: the same files, untouched.
  assert study_run["outputs_after"] == study_run["outputs"]
  assert len(study_run["outputs"]) == 2 * len(_MODELS) + 2 * len(_MODELS) * len(_DATASETS)
  assert _rows(study_run["workdir"]) == study_run["rows"]
