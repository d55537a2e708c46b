"""The embedded default (configs/demo.py), its pieces, and launch/setup.sh's accelerator flag."""

import importlib.util
import json
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslbench_jax import evaluate
from sslbench_jax import summary_table
from sslbench_jax.backbones import random_init
from sslbench_jax.backbones import registry
from sslbench_jax.backbones import weights
from sslbench_jax.data import registry as data_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
SAMPLES = os.path.join(SHARED, "data", "imagenet_samples")
SYNSETS = os.path.join(SHARED, "data", "imagenet_meta", "imagenet_synsets.txt")


def _demo():
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs",
                                                                           "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("arg", [None, "tiny=True"])
def test_demo_model_list(arg):
  demo = _demo()
  c = demo.get_config(arg)
  evaluate.validate(c)
  assert len(c.models) >= 6
  # Every model its own representation source: no two the same numbers.
  pairs = {(m.arch, m.checkpoint, m.representation) for m in c.models.values()}
  assert len(pairs) == len(c.models)
  real = [n for n, m in c.models.items() if m.checkpoint == "package:efficientnet_lite0"]
  reps = {c.models[n].representation for n in real}
  assert "pre_logits" in reps and len({r for r in reps if r.startswith("stage")}) >= 3
  # Floor baselines: random weights of two architectures, seeds stated.
  random = {n: m for n, m in c.models.items() if m.checkpoint.startswith("random:")}
  assert len({m.arch for m in random.values()}) >= 2
  for name, m in random.items():
    seed = random_init.parse_seed(m.checkpoint)
    assert demo.RANDOM_SEEDS[name] == seed
    assert re.search(rf"seed\s+{seed}\b", demo.__doc__), f"{name}'s seed not in the docstring"
  # The classifier head runs for the real network only; every model is probed.
  probes = {n for n, p in c.protocols.items() if p.type != "classify"}
  for name, m in c.models.items():
    run = set(m.protocols) if m.protocols is not None else set(c.protocols)
    if arg is None or not m.representation.startswith("stage"):
      assert probes <= run
    else:  # tiny: the stage models skip the sweeps that compile per feature width
      assert run == probes - {"linear", "logreg"}
    if "classify" in run:
      assert name in real and m.representation == "pre_logits"
  if os.path.isdir(SAMPLES):
    assert {"digits", "imagenet_restricted", "imagenet_samples"} <= set(c.datasets)
    assert sum("classify" in (m.protocols or c.protocols) for m in c.models.values()) == 1


def test_validate_rejects_bad_model_extras():
  demo = _demo()
  cases = [
      ("random_resnet18", "checkpoint", "random:x", "random:x"),
      ("efficientnet_lite0_stage2", "representation", "stage9_avg",
       "config.models.efficientnet_lite0_stage2.representation"),
      ("random_resnet18", "protocols", ["knn_dino", "nope"], "'nope'"),
  ]
  for model, key, value, message in cases:
    c = demo.get_config("tiny=True")
    with c.unlocked():
      c.models[model][key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
      evaluate.validate(c)


def test_random_init_weights_and_provenance(tmp_path):
  out = str(tmp_path / "r.npz")
  small = {"stage_sizes": (1, 1, 1, 1)}  # a small ResNet: the init compiles quickly
  meta = random_init.write("resnet18", 3, out, small)
  assert meta["source"] == "random_init seed=3" and meta["checkpoint"] == "random:3"
  assert "checkpoint_sha256" not in meta and meta["weights_sha256"] == weights.sha256_file(out)
  variables, read_meta = weights.load_variables(out)
  assert random_init.is_current(read_meta, "resnet18", 3, small)
  assert not random_init.is_current(read_meta, "resnet18", 4, small)
  assert not random_init.is_current(read_meta, "resnet18", 3)
  # The module's own initialisers from PRNGKey(seed): Flax's init, run directly
  # (parameter values do not depend on the example's size).
  model = registry.create_model("resnet18", **small)
  ref = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.PRNGKey(3))
  got = dict(jax.tree_util.tree_leaves_with_path(variables))
  want = dict(jax.tree_util.tree_leaves_with_path(dict(ref)))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg=str(k))
  other = random_init.init_variables("resnet18", 4, small)
  assert not np.array_equal(other["params"]["conv1"]["kernel"],
                            variables["params"]["conv1"]["kernel"])
  assert random_init.parse_seed("package:efficientnet_lite0") is None
  with pytest.raises(ValueError, match="random:-1"):
    random_init.parse_seed("random:-1")


@pytest.mark.skipif(not os.path.isdir(SAMPLES), reason=f"ImageNet samples not at {SAMPLES}")
def test_restricted_imagenet_superclasses():
  # Tsipras et al. 2019, Restricted ImageNet (inclusive class-index ranges).
  ranges = [(151, 268), (281, 285), (30, 32), (33, 37), (80, 100), (365, 382), (389, 397),
            (118, 121), (300, 319)]
  with open(SYNSETS) as f:
    wnids = f.read().split()
  files = sorted(n for n in os.listdir(SAMPLES) if n.endswith(".JPEG"))
  want = {"train": [], "test": []}
  for c, (lo, hi) in enumerate(ranges):
    members = [f for f in files if lo <= wnids.index(f.split("_")[0]) <= hi]
    for j, f in enumerate(members):
      want["train" if j % 2 == 0 else "test"].append((f, c))
  assert len(want["train"]) + len(want["test"]) == 203
  for split in ("train", "test"):
    ds = data_registry.open_dataset("imagenet_samples_restricted", split, data_dir=SAMPLES)
    assert ds.label_space.num_classes == 9
    got = sorted((os.path.basename(p), label) for p, label, _ in ds.source.samples)
    assert got == sorted(want[split])


def _write_idx(path, array):
  code = {np.uint8: 0x08}[array.dtype.type]
  header = bytes([0, 0, code, array.ndim]) + b"".join(
      int(n).to_bytes(4, "big") for n in array.shape)
  with open(path, "wb") as f:
    f.write(header + array.tobytes())


def test_fashion_mnist_small_is_a_prefix(tmp_path, monkeypatch):
  rng = np.random.RandomState(0)
  n = {"train": 7, "test": 5}
  arrays = {}
  for split, stem in (("train", "train"), ("test", "t10k")):
    images = rng.randint(0, 256, (n[split], 28, 28)).astype(np.uint8)
    labels = rng.randint(0, 10, n[split]).astype(np.uint8)
    _write_idx(tmp_path / f"{stem}-images-idx3-ubyte", images)
    _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", labels)
    arrays[split] = images, labels
  monkeypatch.setitem(data_registry.FASHION_MNIST_SMALL, "train", 4)
  for split, keep in (("train", 4), ("test", 5)):
    ds = data_registry.open_dataset("fashion_mnist_small", split, data_dir=str(tmp_path))
    images, labels = arrays[split]
    assert len(ds.source) == keep
    for i in range(keep):
      image, label, _ = ds.source.read(i)
      np.testing.assert_array_equal(image, images[i])
      assert label == labels[i]


def _pinned_jax():
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    return re.search(r'"jax==([^"]+)"', f.read()).group(1)


@pytest.mark.parametrize("args,env,extra", [
    (["--accelerator", "cuda12"], {}, "cuda12"),
    (["--accelerator=tpu"], {}, "tpu"),
    ([], {"SSLBENCH_ACCELERATOR": "cuda12"}, "cuda12"),
    (["--accelerator", "tpu"], {"SSLBENCH_ACCELERATOR": "cuda12"}, "tpu"),
    ([], {}, None),
])
def test_setup_accelerator_dry_run(args, env, extra):
  environ = {k: v for k, v in os.environ.items() if k != "SSLBENCH_ACCELERATOR"}
  environ.update(env)
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "setup.sh"), *args, "--dry-run"],
                        capture_output=True, text=True, env=environ, check=True)
  pip = [l for l in proc.stdout.splitlines() if "jax[" in l]
  if extra is None:
    assert not pip and "no extra" in proc.stdout
  else:
    assert pip == [f"+ .venv/bin/python -m pip install -q jax[{extra}]=={_pinned_jax()}"]


def test_setup_rejects_unknown_accelerator():
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "setup.sh"), "--accelerator",
                         "rocm", "--dry-run"], capture_output=True, text=True)
  assert proc.returncode == 2 and "rocm" in proc.stderr and not proc.stdout


def test_launch_scripts_use_the_flag():
  with open(os.path.join(ROOT, "launch", "slurm.sbatch")) as f:
    assert re.search(r"setup\.sh --accelerator \"\$\{SSLBENCH_ACCELERATOR:-cuda12\}\"", f.read())
  with open(os.path.join(ROOT, "launch", "tpu_pod.sh")) as f:
    text = f.read()
  assert "setup.sh --accelerator tpu" in text and "pip install" not in text


def test_tiny_demo_end_to_end(tmp_path):
  """tiny=True, cut to kNN on digits: every model converts/initialises, extracts, is scored."""
  c = _demo().get_config("tiny=True")
  with c.unlocked():
    c.datasets = {"digits": c.datasets["digits"]}
    knn = c.protocols["knn_dino"]
    knn.datasets = ["digits"]
    c.protocols = {"knn_dino": knn}
    for m in c.models.values():
      m.protocols = None
    c.analysis.n_boot = c.analysis.n_perm = 20
  summary = evaluate.run(c, str(tmp_path))
  with open(summary["results"]) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  models = {r["model"] for r in rows if r["metric"] == "top1"}
  assert models == set(c.models) and len(models) >= 6
  for r in rows:
    hp = json.loads(r["hparams"]) if isinstance(r["hparams"], str) else r["hparams"]
    assert hp["representation"] == c.models[r["model"]].representation
    assert hp["checkpoint"] == c.models[r["model"]].checkpoint
  with open(os.path.join(tmp_path, "weights", "random_resnet18.npz.json")) as f:
    assert json.load(f)["source"] == "random_init seed=1"
  # Different representations, different numbers (not one model six times).
  top1 = {r["model"]: r["value"] for r in rows
          if r["metric"] == "top1" and r["protocol"] == "knn_dino_k10"}
  assert len(set(top1.values())) >= 4
  table = summary_table.format_table(summary["csv"])
  assert all(f"] {m}" in table for m in c.models)
  assert "digits / knn_dino_k10" in table


def test_summary_table_layout(tmp_path):
  path = tmp_path / "r.csv"
  rows = [("m_a", "ds1", "knn", "top1", 91.25), ("m_b", "ds1", "knn", "top1", 50.0),
          ("m_a", "ds1", "knn", "top5", 99.0), ("m_a", "ds2", "fs_1shot", "top1_mean", 40.04),
          ("m_b", "ds2", "fs_1shot", "top1_std", 3.0), ("m_a", "ds1", "classify", "top1", 7.0)]
  with open(path, "w") as f:
    f.write("model,dataset,split,protocol,metric,value\n")
    f.writelines(f"{m},{d},test,{p},{k},{v}\n" for m, d, p, k, v in rows)
  lines = summary_table.format_table(str(path)).splitlines()
  assert lines[1:3] == ["  [1] m_a", "  [2] m_b"]
  cells = {l.split()[0] + " " + l.split()[2]: l.split()[3:] for l in lines[5:]}
  # Rows grouped by dataset; top5 and top1_std ignored; "-" where a model has no number.
  assert list(cells) == ["ds1 knn", "ds1 classify", "ds2 fs_1shot"]
  assert cells == {"ds1 knn": ["91.2", "50.0"], "ds1 classify": ["7.0", "-"],
                   "ds2 fs_1shot": ["40.0", "-"]}
  assert "no top3 results" in summary_table.format_table(str(path), metric="top3")


def test_fashion_mnist_joins_when_its_package_is_present(tmp_path):
  demo = _demo()
  demo._FASHION_MNIST = str(tmp_path / "absent")  # pylint: disable=protected-access
  assert "fashion_mnist" not in demo.get_config().datasets
  demo._FASHION_MNIST = str(tmp_path)  # pylint: disable=protected-access
  c = demo.get_config()
  evaluate.validate(c)
  assert c.datasets.fashion_mnist.dataset == "fashion_mnist_small"
  for name, p in c.protocols.items():
    assert ("fashion_mnist" in p.datasets) == (name != "classify")
  assert "fashion_mnist" not in demo.get_config("tiny=True").datasets
