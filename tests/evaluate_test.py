"""The main job (``sslbench-jax evaluate``) on the demo config in tiny mode."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from sslbench_jax import evaluate
from sslbench_jax import plan
from sslbench_jax.data import derived
from sslbench_jax.features import io
from sslbench_jax.features import passes
from sslbench_jax.protocols import base
from sslbench_jax.protocols import registry
import multiprocess_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_config(arg="tiny=True"):
  spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _demo_lite0_config():
  """The tiny demo restricted to its real network, efficientnet_lite0.

  The demo compares 6 models; these tests check the runner on one of them
  (14 minutes for all 6 on 2 shared cores, ~2 for this one).
  """
  config = _demo_config()
  config.models = {"efficientnet_lite0": config.models.efficientnet_lite0}
  return config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  summary = evaluate.run(_demo_lite0_config(), workdir)
  return workdir, summary


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_demo_writes_results_and_report(demo_run):
  workdir, summary = demo_run
  rows = _rows(workdir)
  assert summary["new_rows"] == len(rows) > 0
  protocols = {r["protocol"] for r in rows}
  assert {"knn_dino_k10", "knn_dino_k20", "knn_euclidean", "linear", "logreg"} <= protocols
  for r in rows:
    assert r["checkpoint_sha256"] and r["model"] == "efficientnet_lite0"
    assert r["versions"] and r["device_count"] >= 1
    assert 0.0 <= r["value"] <= 100.0
  with open(summary["csv"]) as f:
    header = next(csv.reader(f))
  assert {"model", "dataset", "split", "protocol", "metric", "value", "n_examples"} <= set(header)
  assert os.path.exists(summary["report"])


def test_demo_knn_matches_sklearn_on_its_own_features(demo_run):
  workdir, _ = demo_run
  tr = io.load(os.path.join(workdir, "features",
                            "efficientnet_lite0__digits__train__pre_logits.npz"))
  te = io.load(os.path.join(workdir, "features",
                            "efficientnet_lite0__digits__test__pre_logits.npz"))
  ref = KNeighborsClassifier(n_neighbors=20, weights="distance").fit(tr.features, tr.labels)
  expected = 100.0 * np.mean(ref.predict(te.features) == te.labels)
  got = [r["value"] for r in _rows(workdir) if r["protocol"] == "knn_euclidean"
         and r["metric"] == "top1" and r["dataset"] == "digits"]
  assert got == [pytest.approx(expected, abs=1e-9)]
  assert tr.meta["arch"] == "efficientnet_lite0" and len(te.labels) == 360


def test_rerun_skips_finished_steps(demo_run):
  workdir, _ = demo_run
  before = _rows(workdir)
  summary = evaluate.run(_demo_lite0_config(), workdir)
  assert summary["new_rows"] == 0
  assert _rows(workdir) == before


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.__setitem__("colour", 1), "colour"),
    (lambda c: c.models.efficientnet_lite0.__setitem__("weights", "x"), "weights"),
    (lambda c: c.protocols.knn_dino.__setitem__("kk", 3), "kk"),
    (lambda c: c.protocols.knn_dino.__setitem__("datasets", ["nope"]), "nope"),
    (lambda c: c.models.efficientnet_lite0.__setitem__("arch", "resnet7"), "resnet7"),
    (lambda c: c.datasets.digits.__setitem__("test_datset", "digits"), "test_datset"),
    (lambda c: c.datasets.digits.__setitem__("test_dataset", "imagenet_b"), "imagenet_b"),
    (lambda c: c.datasets.digits.__setitem__("test_split", "validation"),
     "test_split 'validation' is not a split of digits"),
])
def test_config_errors_name_the_key(mutate, message, tmp_path):
  config = _demo_config()
  with config.unlocked():
    mutate(config)
  with pytest.raises(ValueError, match=message):
    evaluate.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # validated before any work


@pytest.mark.parametrize("override, message", [
    ("--config.nosuchkey=1", "--config.nosuchkey: unknown config key 'nosuchkey'"),
    ("--config.sed=3", "--config.sed: unknown config key 'sed' (did you mean 'seed'?)"),
    ("--config.models.efficientnet_lite0.archh=x",
     "--config.models.efficientnet_lite0.archh: unknown config key 'archh' "
     "(did you mean 'arch'?)"),
])
def test_cli_rejects_override_of_unknown_key_in_one_line(tmp_path, override, message):
  """Was a 56-line traceback (exit 1); now the file-level check's one line, exit 2."""
  proc = subprocess.run(
      [sys.executable, "-m", "sslbench_jax.cli", "evaluate",
       "--config", os.path.join(ROOT, "configs", "demo.py") + ":tiny=True",
       "--workdir", str(tmp_path), override],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [f"evaluate: error: {message}"]
  assert not os.listdir(tmp_path)


def test_cli_rejects_unknown_config_argument_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "sslbench_jax.cli", "evaluate",
       "--config", os.path.join(ROOT, "configs", "demo.py") + ":tinyy=1",
       "--workdir", str(tmp_path)],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2
  [line] = proc.stderr.splitlines()
  assert line.startswith("evaluate: error: flag --config=")
  assert "unknown config argument 'tinyy'; valid: ['tiny']" in line
  assert not os.listdir(tmp_path)


def _load_config(name, arg):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_closer_look_config_is_valid_and_complete():
  config = _load_config("closer_look", "checkpoints=/ckpt")
  evaluate.validate(config)
  archs = [m.arch for m in config.models.values()]
  assert archs.count("resnet50") == 17 and archs.count("vit_base_patch16") == 9
  assert len(config.datasets) == 11
  assert config.datasets.cub.preprocessing == "pad_square"
  assert config.datasets.pascal.preprocessing == "crop_square"
  small = _load_config("closer_look", "checkpoints=/c,models=swav+mae,datasets=cub")
  assert sorted(small.models) == ["mae", "swav"] and list(small.datasets) == ["cub"]
  with pytest.raises(ValueError, match="checkpoints"):
    _load_config("closer_look", None)
  with pytest.raises(ValueError, match="unknown models"):
    _load_config("closer_look", "checkpoints=/c,models=swav+nope")


def test_two_processes_give_the_single_process_results(demo_run, tmp_path):
  """The same command on 2 'hosts' x 2 devices (jax.distributed over gloo)."""
  workdir, _ = demo_run
  mp_dir = str(tmp_path / "mp")
  config_file = tmp_path / "demo_lite0.py"  # the fixture's config, as a file
  config_file.write_text(
      "import importlib.util\n"
      "def get_config():\n"
      f"  spec = importlib.util.spec_from_file_location('demo', {os.path.join(ROOT, 'configs', 'demo.py')!r})\n"
      "  module = importlib.util.module_from_spec(spec)\n"
      "  spec.loader.exec_module(module)\n"
      "  c = module.get_config('tiny=True')\n"
      "  c.models = {'efficientnet_lite0': c.models.efficientnet_lite0}\n"
      "  return c\n")
  port = multiprocess_util.free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "sslbench_jax.cli", "evaluate",
         "--config", str(config_file), "--workdir", mp_dir], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  def values(rows):
    return {(r["dataset"], r["protocol"], r["metric"], r["hparams"]): r["value"]
            for r in rows}

  multi = _rows(mp_dir)
  assert values(multi) == values(_rows(workdir))
  assert len(values(multi)) == len(multi)
  assert {r["device_count"] for r in multi} == {4}


# --------------------------------------------------------------------------
# Train on one dataset, test on others (ImageNet -> its variants).

SHARED_DATA = os.path.join(os.environ.get(
    "SSLBENCH_SHARED", os.path.join(os.path.dirname(ROOT), "shared")), "data")
_VAL = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 13)]  # val image 1: empty ReaL set


def _meta(name):
  with open(os.path.join(SHARED_DATA, "imagenet_meta", name)) as f:
    return json.load(f) if name.endswith(".json") else [l.strip() for l in f if l.strip()]


def _flipped(src, dst):
  """A new image of the same class: the sample mirrored (distinct features)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with Image.open(src) as im:
    im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(dst, quality=95)


def _variant_data(root, samples_dir):
  """ImageNet folders made from the real samples (one image per class).

  ``in1k/train/<wnid>/``: 24 originals (the classes of the even-numbered val
  images below, 7 ImageNet-R classes, fillers); ``in1k/val/ILSVRC2012_val_*``:
  mirrored samples of the classes of val images 1..12, which is also the ReaL
  folder; ``r/<wnid>/``: mirrored samples of 10 ImageNet-R classes (7 trained
  on).
  """
  wnids = _meta("imagenet_synsets.txt")
  by_wnid = {f.split("_", 1)[0]: os.path.join(samples_dir, f) for f in os.listdir(samples_dir)}
  val_file_labels = _meta("val_image_to_1k_label.json")
  val_labels = [val_file_labels[name] for name in _VAL]
  r_classes = [int(c) for c in _meta("imagenet_r_indices.txt")]
  r_test = r_classes[:10]
  train = set(val_labels[1::2]) | set(r_test[:7])
  fillers = (c for c in range(0, 1000, 37) if c not in set(r_test) | set(val_labels))
  while len(train) < 24:
    train.add(next(fillers))
  assert len(set(r_test) & train) == 7
  for c in train:
    dst = os.path.join(root, "in1k", "train", wnids[c], os.path.basename(by_wnid[wnids[c]]))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(by_wnid[wnids[c]], dst)
  for name, c in zip(_VAL, val_labels):
    _flipped(by_wnid[wnids[c]], os.path.join(root, "in1k", "val", name))
  for c in r_test:
    _flipped(by_wnid[wnids[c]], os.path.join(root, "r", wnids[c], "flipped.JPEG"))
  return dict(in1k=os.path.join(root, "in1k"), r=os.path.join(root, "r"),
              train=sorted(train), r_classes=r_classes)


def _variants_config(data):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.models = {"lite0": dict(arch="efficientnet_lite0", checkpoint="package:efficientnet_lite0",
                            select=None, allow_missing=None, options={})}
  # The model's own preprocessing (224x224): its head must be right on real images.
  train = dict(dataset="imagenet1k", train_split="train", data_dir=data["in1k"],
               preprocessing=None)
  c.datasets = {
      "imagenet": dict(train, test_split="validation"),
      "imagenet_real": dict(train, test_dataset="imagenet_real", test_split="validation"),
      "imagenet_r": dict(train, test_dataset="imagenet_r", test_split="test",
                         test_data_dir=data["r"]),
  }
  c.protocols = {
      "classify": dict(type="classify", datasets=list(c.datasets)),
      "knn": dict(type="knn", datasets=list(c.datasets), knn_k=[3],
                  knn_metric="euclidean"),
  }
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=16, steps_per_shard=4)
  c.analysis = dict(n_boot=20, n_perm=20)
  return c


def _run_counting_extractions(config, workdir):
  """evaluate.run, recording every (dataset, split, representation) extracted."""
  calls, real_run = [], passes.extract_split

  def spy(models, dataset, split, *args, **kwargs):
    calls.extend((dataset, split, r) for _, r, _ in models)
    return real_run(models, dataset, split, *args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(passes, "extract_split", spy)
    summary = evaluate.run(config, workdir)
  return summary, calls


@pytest.fixture(scope="module")
def variants_run(tmp_path_factory):
  samples_dir = os.path.join(SHARED_DATA, "imagenet_samples")
  if not os.path.isdir(samples_dir):
    pytest.skip(f"real ImageNet samples not found at {samples_dir}")
  root = str(tmp_path_factory.mktemp("variants"))
  data = _variant_data(os.path.join(root, "data"), samples_dir)
  workdir = os.path.join(root, "work")
  summary, calls = _run_counting_extractions(_variants_config(data), workdir)
  return workdir, data, summary, calls


def _feats(workdir, name):
  return io.load(os.path.join(workdir, "features", f"lite0__{name}.npz"))


def test_variants_extract_train_features_once_and_name_test_sets(variants_run):
  workdir, _, summary, calls = variants_run
  # ReaL's features are cut out of val's: its images go through the model once.
  assert sorted(calls) == sorted([
      ("imagenet1k", "train", "pre_logits"),  # once, for the three test sets
      ("imagenet1k", "validation", "pre_logits"), ("imagenet1k", "validation", "logits"),
      ("imagenet_r", "test", "pre_logits"), ("imagenet_r", "test", "logits")])
  assert len(os.listdir(os.path.join(workdir, "cache"))) == 5  # one cache entry each
  assert sorted(os.listdir(os.path.join(workdir, "features"))) == sorted(
      f"lite0__{n}.npz" for n in (
          "imagenet__train__pre_logits", "imagenet__validation__pre_logits",
          "imagenet__validation__logits",
          "imagenet_real__imagenet_real__validation__pre_logits",
          "imagenet_real__imagenet_real__validation__logits",
          "imagenet_r__imagenet_r__test__pre_logits", "imagenet_r__imagenet_r__test__logits"))
  rows = _rows(workdir)
  assert summary["new_rows"] == len(rows)
  got = {(r["protocol"], r["dataset"], r["split"]): set() for r in rows}
  for r in rows:
    got[r["protocol"], r["dataset"], r["split"]].add(r["metric"])
  expected = {("imagenet1k", "validation"): {"top1", "top5"},
              ("imagenet_real", "validation"): {"real_top1"},
              ("imagenet_r", "test"): {"subset_top1", "top1", "top5"}}
  assert got == {(p, d, s): m for p in ("classify", "knn") for (d, s), m in expected.items()}
  for r in rows:
    if r["protocol"] == "knn":
      hp = json.loads(r["hparams"])
      assert (hp["train_dataset"], hp["train_split"], hp["k"]) == ("imagenet1k", "train", 3)


def _real_sets():
  real = _meta("imagenet_real_labels.json")
  return {name: set(real[int(name[15:23]) - 1]) for name in _VAL}


def _reference(scores, labels, ids, dataset, r_classes, top5_hits=None):
  """Accuracies (%) of (N, 1000) scores, computed here with NumPy."""
  pred = np.argmax(scores, 1)
  if dataset == "imagenet_real":
    sets = _real_sets()
    sets = [sets[os.path.basename(i)] for i in ids]
    scored = [k for k, s in enumerate(sets) if s]
    return {"real_top1": 100.0 * np.mean([pred[k] in sets[k] for k in scored])}, len(scored)
  top5 = np.argsort(-scores, 1, kind="stable")[:, :5]
  out = {"top1": 100.0 * np.mean(pred == labels),
         "top5": 100.0 * np.mean(top5_hits if top5_hits is not None else
                                 [y in t for y, t in zip(labels, top5)])}
  if dataset == "imagenet_r":
    sub = np.asarray(r_classes)
    out["subset_top1"] = 100.0 * np.mean(sub[np.argmax(scores[:, sub], 1)] == labels)
  return out, len(labels)


_TEST_FILES = {"imagenet1k": "imagenet__validation",
               "imagenet_real": "imagenet_real__imagenet_real__validation",
               "imagenet_r": "imagenet_r__imagenet_r__test"}


def test_variants_classify_scores_the_head_in_each_label_space(variants_run):
  workdir, data, _, _ = variants_run
  rows = [r for r in _rows(workdir) if r["protocol"] == "classify"]
  for dataset, name in _TEST_FILES.items():
    fs = _feats(workdir, f"{name}__logits")
    labels = fs.labels if fs.labels.ndim == 1 else None
    expected, n = _reference(fs.features, labels, fs.ids, dataset, data["r_classes"])
    got = {r["metric"]: r["value"] for r in rows if r["dataset"] == dataset}
    assert got == pytest.approx(expected, abs=1e-4), dataset
    assert {r["n_examples"] for r in rows if r["dataset"] == dataset} == {n}
  # ReaL drops val image 1 (empty label set); R holds the 10 mirrored renditions.
  assert {r["dataset"]: r["n_examples"] for r in rows} == {
      "imagenet1k": 12, "imagenet_real": 11, "imagenet_r": 10}
  # The head is good on these real images: checks the labels line up.
  assert {r["metric"]: r["value"] for r in rows
          if r["dataset"] == "imagenet1k"}["top5"] >= 75.0


@pytest.mark.filterwarnings("ignore:The number of unique classes")
def test_variants_knn_trained_on_imagenet_matches_sklearn_on_each_test_set(variants_run):
  workdir, data, _, _ = variants_run
  train = _feats(workdir, "imagenet__train__pre_logits")
  assert sorted(set(train.labels.tolist())) == data["train"]
  knn = KNeighborsClassifier(n_neighbors=3, weights="distance").fit(train.features,
                                                                    train.labels)
  rows = [r for r in _rows(workdir) if r["protocol"] == "knn"]
  for dataset, name in _TEST_FILES.items():
    fs = _feats(workdir, f"{name}__pre_logits")
    # (N, 1000) vote shares: zero for classes without a vote.
    scores = np.zeros((len(fs.features), 1000))
    scores[:, knn.classes_] = knn.predict_proba(fs.features)
    labels = fs.labels if fs.labels.ndim == 1 else None
    # kNN's top-5 counts a label only if it got a vote.
    hits = None if labels is None else scores[np.arange(len(labels)), labels] > 0
    expected, n = _reference(scores, labels, fs.ids, dataset, data["r_classes"], hits)
    got = {r["metric"]: r["value"] for r in rows if r["dataset"] == dataset}
    assert got == pytest.approx(expected, abs=1e-4), dataset
    assert {r["n_examples"] for r in rows if r["dataset"] == dataset} == {n}


@pytest.fixture(scope="module")
def direct_real(variants_run, tmp_path_factory):
  """ReaL extracted directly (no derivation), as a run without val would."""
  workdir, data, _, _ = variants_run
  config = _variants_config(data)
  _, real = plan.splits(config.datasets.imagenet_real)
  model = passes.load_model(os.path.join(workdir, "weights", "lite0.npz"))
  out = str(tmp_path_factory.mktemp("direct_real"))
  ex = config.extraction
  results = passes.extract_split(
      [(model, rep, ex.dtype) for rep in ("pre_logits", "logits")], real.dataset, real.split,
      real.data_dir, real.preprocessing, cache_root=os.path.join(out, "cache"),
      batch_size_per_device=ex.batch_size_per_device, steps_per_shard=ex.steps_per_shard)
  direct = {}
  for rep, result in zip(("pre_logits", "logits"), results):  # as the files read back
    io.save(os.path.join(out, f"real__{rep}.npz"), result.features)
    direct[rep] = io.load(os.path.join(out, f"real__{rep}.npz"))
  return direct


@pytest.mark.parametrize("rep", ["pre_logits", "logits"])
def test_variants_real_derived_from_val_equals_direct_extraction(variants_run, direct_real,
                                                                 rep):
  workdir, _, _, _ = variants_run
  derived = _feats(workdir, f"{_TEST_FILES['imagenet_real']}__{rep}")
  direct = direct_real[rep]
  val = _feats(workdir, f"{_TEST_FILES['imagenet1k']}__{rep}")
  # Val image 1 has an empty ReaL set: ReaL is val images 2..12, in val order.
  assert direct.ids.tolist() == _VAL[1:] == val.ids.tolist()[1:]
  np.testing.assert_array_equal(derived.ids, direct.ids)
  assert derived.features.dtype == direct.features.dtype == np.float32
  np.testing.assert_array_equal(derived.features, direct.features)
  np.testing.assert_array_equal(derived.features, val.features[1:])
  assert derived.labels.dtype == direct.labels.dtype == np.int8
  np.testing.assert_array_equal(derived.labels, direct.labels)
  # Multi-hot rows are the ReaL sets of the shipped label file, read here.
  sets = _real_sets()
  expected = np.zeros((11, 1000), np.int8)
  for k, name in enumerate(_VAL[1:]):
    expected[k, sorted(sets[name])] = 1
  np.testing.assert_array_equal(derived.labels, expected)
  # The meta is the direct extraction's, except that it names its val file
  # instead of a cache entry.
  assert derived.meta.pop("derived_from") == dict(
      file=f"lite0__{_TEST_FILES['imagenet1k']}__{rep}.npz", dataset="imagenet1k",
      split="validation", cache_key=val.meta["cache_key"])
  direct_meta = dict(direct.meta)
  assert direct_meta.pop("cache_key") != val.meta["cache_key"]
  assert derived.meta == direct_meta
  assert (derived.meta["dataset"], derived.meta["split"], derived.meta["num_examples"],
          derived.meta["source"]["label_space"]["name"]) == (
              "imagenet_real", "validation", 11, "imagenet_real")


def test_variants_real_rows_are_those_of_direct_features(variants_run, direct_real,
                                                         tmp_path):
  workdir, _, _, _ = variants_run
  rows = [r for r in _rows(workdir) if r["dataset"] == "imagenet_real"]
  path = str(tmp_path / "direct_logits.npz")
  io.save(path, direct_real["logits"])
  classify = registry.get("classify")
  result = classify.run(None, base.load_features(path), classify.options(),
                        context=base.RunContext(model="lite0", dataset="imagenet_real"))
  expected = {(r["metric"], r["value"], r["n_examples"]) for r in result.rows}
  assert {(r["metric"], r["value"], r["n_examples"]) for r in rows
          if r["protocol"] == "classify"} == expected


def test_variants_real_not_derived_from_other_images(variants_run, tmp_path):
  workdir, data, _, _ = variants_run
  config = _variants_config(data)
  val = _feats(workdir, f"{_TEST_FILES['imagenet1k']}__pre_logits")
  _, real = plan.splits(config.datasets.imagenet_real)
  # Val rows in another order are not the images ReaL reads: no derived set.
  shuffled = io.FeatureSet(val.features[::-1], val.labels[::-1], val.ids[::-1], val.meta)
  assert derived.derive_features(shuffled, real.dataset, real.split,
                                 data_dir=real.data_dir) is None
  assert derived.derive_features(val, real.dataset, real.split,
                                 data_dir=real.data_dir) is not None


def test_real_derived_only_from_val_of_the_same_images_and_preprocessing():
  val = plan.Split("imagenet1k", "/in", "val", None)
  others = [plan.Split("imagenet1k", "/other", "validation", None),
            plan.Split("imagenet1k", "/in", "validation", "crop_square"),
            plan.Split("imagenet1k", "/in", "train", None)]
  real = plan.Split("imagenet_real", "/in", "validation", None)
  pick = plan.derivable_parent
  assert pick(real, {s: "" for s in others + [val]}) == val  # "val" aliases "validation"
  assert pick(real, {s: "" for s in others}) is None
  assert pick(val, {val: ""}) is None  # only ReaL is derived


def test_variants_rerun_does_nothing(variants_run):
  workdir, data, _, _ = variants_run
  before = _rows(workdir)
  summary, calls = _run_counting_extractions(_variants_config(data), workdir)
  assert summary["new_rows"] == 0 and calls == []
  assert _rows(workdir) == before


def test_variants_report_ranks_on_each_test_sets_primary_metric(variants_run):
  workdir, _, summary, _ = variants_run
  rows = _rows(workdir)
  with open(summary["primary_csv"]) as f:
    primary = list(csv.DictReader(f))
  # One row per measurement: ReaL's real_top1, R's subset_top1, val's top1.
  metric_of = {"imagenet1k": "top1", "imagenet_real": "real_top1",
               "imagenet_r": "subset_top1"}
  expected = sorted((r["protocol"], r["dataset"], r["value"]) for r in rows
                    if r["metric"] == metric_of[r["dataset"]])
  assert sorted((r["protocol"], r["dataset"], float(r["value"])) for r in primary) == expected
  assert {r["metric"] for r in primary} == {"primary"}
  with open(os.path.join(workdir, "report", "rank_changes.csv")) as f:
    changes = list(csv.DictReader(f))
  value = {(r["protocol"], r["dataset"]): r["value"] for r in rows
           if r["metric"] == metric_of[r["dataset"]]}
  assert sorted((r["protocol"], r["variant"]) for r in changes) == [
      (p, v) for p in ("classify", "knn") for v in ("imagenet_r", "imagenet_real")]
  for r in changes:  # the variants' canonical names are their registry names
    assert float(r["value_variant"]) == pytest.approx(value[r["protocol"], r["variant"]])
    assert float(r["value_imagenet"]) == pytest.approx(value[r["protocol"], "imagenet1k"])


def test_feature_stems_share_splits_and_never_clash():
  common = dict(dataset="imagenet1k", train_split="train", test_split="validation",
                data_dir="/a", preprocessing=None)
  datasets = ml_collections.ConfigDict({
      "val": dict(common),
      "r": dict(common, test_dataset="imagenet_r", test_split="test"),
      # same names as "val"'s but another folder: must not share its file
      "b": dict(common, train_split="validation", test_data_dir="/b"),
  })
  stems = plan.feature_stems(datasets)
  split = {n: plan.splits(d) for n, d in datasets.items()}
  assert split["val"][0] == split["r"][0] and split["b"][0] == split["val"][1]
  # A shared split is named after the first entry using it (entries in name order).
  assert stems[split["val"][0]] == "r__train"
  assert stems[split["val"][1]] == "b__validation"
  assert stems[split["r"][1]] == "r__imagenet_r__test"
  # b's test split has the same stem as its train split but another folder.
  assert stems[split["b"][1]].startswith("b__validation__")
  assert len(stems) == 4 == len(set(stems.values()))


def test_imagenet_variants_config_is_valid_and_complete():
  config = _load_config("imagenet_variants", "checkpoints=/ckpt,data_dir=/tfds,r_dir=/r")
  evaluate.validate(config)
  assert len(config.models) == 26
  tests = {n: (d.get("test_dataset") or d.dataset, d.test_split, d.get("test_data_dir"))
           for n, d in config.datasets.items()}
  assert tests == {"imagenet": ("imagenet1k", "validation", None),
                   "imagenet_real": ("imagenet_real", "validation", None),
                   "imagenet_v2": ("imagenet_v2", "test", None),
                   "imagenet_r": ("imagenet_r", "test", "/r"),
                   "imagenet_sketch": ("imagenet_sketch", "test", None),
                   "imagenet_a": ("imagenet_a", "test", None)}
  for d in config.datasets.values():
    assert (d.dataset, d.train_split, d.data_dir) == ("imagenet1k", "train", "/tfds")
  # One ImageNet-1k train feature file shared by the 6 test sets: 7 per model.
  assert len(set(plan.feature_stems(config.datasets).values())) == 7
  # The study's probes (closer_look.py), on every entry.
  study = _load_config("closer_look", "checkpoints=/ckpt").protocols
  assert sorted(config.protocols) == sorted(study) == ["knn", "knn_norm", "linear", "linear_bn"]
  for name, p in config.protocols.items():
    assert sorted(p.datasets) == sorted(config.datasets)
    assert ({k: v for k, v in p.items() if k != "datasets"} ==
            {k: v for k, v in study[name].items() if k != "datasets"})
  small = _load_config("imagenet_variants", "checkpoints=/c,models=swav,variants=imagenet_r")
  assert list(small.models) == ["swav"] and sorted(small.datasets) == ["imagenet", "imagenet_r"]
  with pytest.raises(ValueError, match="checkpoints"):
    _load_config("imagenet_variants", None)
  with pytest.raises(ValueError, match="unknown variants"):
    _load_config("imagenet_variants", "checkpoints=/c,variants=imagenet_b")
