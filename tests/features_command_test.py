"""Tests of ``sslbench-jax features``: a folder of JPEGs -> .npz equal to a direct forward pass.

The model is a real registry architecture (ViT) shrunk through its
``arch_options`` and saved like a converted checkpoint (npz + sidecar), so the
command has to read the arch and options from the sidecar and pick the arch's
default preprocessing on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from sslbench_jax.backbones import registry
from sslbench_jax.backbones import weights
from sslbench_jax.data import preprocess
from sslbench_jax.features import io as features_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = "vit_small_patch16"
OPTIONS = {"width": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  images = tmp / "images"
  (images / "sub").mkdir(parents=True)
  rng = np.random.RandomState(0)
  for i, (h, w) in enumerate([(240, 320), (300, 260), (256, 256), (200, 410), (280, 300)]):
    folder = images / "sub" if i == 4 else images
    Image.fromarray(rng.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(
        folder / f"photo_{i}.jpg", quality=92)
  (images / "notes.txt").write_text("not an image")
  model = registry.create_model(ARCH, **OPTIONS)
  variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 224, 224, 3)))
  path = str(tmp / "tiny_vit.npz")
  weights.save_variables(path, jax.tree.map(np.asarray, variables),
                         {"arch": ARCH, "arch_options": OPTIONS})
  return dict(tmp=tmp, images=str(images), weights=path)


def _cli(*args, check=True):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-m", "sslbench_jax.cli", "features",
                         "--noprogress", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=180)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _reference(setup, names):
  variables, meta = weights.load_variables(setup["weights"])
  model = registry.create_model(meta["arch"], **meta["arch_options"])
  preset = preprocess.get_preset(registry.default_preprocessing(ARCH))
  batch = []
  for name in names:
    with Image.open(os.path.join(setup["images"], name)) as img:
      batch.append(preset(img))
  return {k: np.asarray(v) for k, v in
          model.apply(variables, np.stack(batch), train=False).items()}


def test_images_to_npz_equals_direct_apply(setup):
  out = str(setup["tmp"] / "feats.npz")
  cache = str(setup["tmp"] / "cache")
  proc = _cli("--weights", setup["weights"], "--images", setup["images"], "--out", out,
              "--cache", cache, "--batch_size_per_device", "2", "--steps_per_shard", "1")
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["num_examples"] == 5 and summary["shards_computed"] == 3
  fs = features_io.load(out)
  names = ["photo_0.jpg", "photo_1.jpg", "photo_2.jpg", "photo_3.jpg", "sub/photo_4.jpg"]
  assert list(fs.ids) == names
  ref = _reference(setup, names)
  np.testing.assert_allclose(fs.features, ref["pre_logits"], atol=1e-5, rtol=0)
  assert fs.meta["arch"] == ARCH and fs.meta["preprocessing"] == "imagenet_bicubic"
  assert fs.meta["weights_sha256"] == weights.sha256_file(setup["weights"])

  # Same request again: served from the cache, nothing recomputed.
  again = _cli("--weights", setup["weights"], "--images", setup["images"], "--out", out,
               "--cache", cache, "--batch_size_per_device", "2")
  summary = json.loads(again.stdout.strip().splitlines()[-1])
  assert summary["shards_computed"] == 0 and summary["shards_reused"] == 3
  np.testing.assert_array_equal(features_io.load(out).features, fs.features)

  # Another representation is another cache entry.
  out4 = str(setup["tmp"] / "last4.npz")
  _cli("--weights", setup["weights"], "--images", setup["images"], "--out", out4,
       "--cache", cache, "--representation", "last4_cls", "--arch", ARCH)
  fs4 = features_io.load(out4)
  np.testing.assert_allclose(fs4.features, ref["last4_cls"], atol=1e-5, rtol=0)
  assert len(os.listdir(cache)) == 2


def test_registry_dataset_source(setup):
  # data.registry's generic "folder" dataset: <data_dir>/<split>/<class>/*.
  root = setup["tmp"] / "ds"
  for cls, seed in (("a", 1), ("b", 2)):
    (root / "train" / cls).mkdir(parents=True)
    rng = np.random.RandomState(seed)
    for i in range(2):
      Image.fromarray(rng.randint(0, 256, (230, 250, 3)).astype(np.uint8)).save(
          root / "train" / cls / f"{i}.jpg")
  out = str(setup["tmp"] / "ds.npz")
  _cli("--weights", setup["weights"], "--dataset", "folder", "--split", "train",
       "--data_dir", str(root), "--out", out, "--representation", "cls")
  fs = features_io.load(out)
  assert list(fs.ids) == ["a/0.jpg", "a/1.jpg", "b/0.jpg", "b/1.jpg"]
  np.testing.assert_array_equal(fs.labels, [0, 0, 1, 1])
  ref = _reference(dict(setup, images=str(root / "train")), list(fs.ids))["cls"]
  np.testing.assert_allclose(fs.features, ref, atol=1e-5, rtol=0)
  assert fs.meta["dataset"] == "folder" and fs.meta["split"] == "train"
  assert fs.meta["source"]["label_space"]["num_classes"] == 2


@pytest.mark.parametrize("args, message", [
    (["--images", "/nonexistent/dir", "--out", "x.npz"],
     "image folder /nonexistent/dir does not exist"),
    (["--images", "{images}", "--out", "x.npz", "--representation", "nope"],
     "Unknown representation 'nope'; this model returns: cls, last4_cls"),
    (["--images", "{images}", "--out", "x.npz", "--arch", "resnet50"],
     "--arch resnet50 but"),
    (["--images", "{images}"], "nothing to write"),
    (["--images", "{images}", "--dataset", "cifar100", "--out", "x.npz"],
     "exactly one source"),
])
def test_bad_input_gives_one_line_error(setup, args, message):
  args = [a.format(images=setup["images"]) for a in args]
  proc = _cli("--weights", setup["weights"], *args, check=False)
  assert proc.returncode != 0
  errors = [l for l in proc.stderr.splitlines() if l.startswith("features: error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_missing_weights_is_one_line(setup):
  proc = _cli("--weights", str(setup["tmp"] / "none.npz"), "--images", setup["images"],
              "--out", "x.npz", check=False)
  assert proc.returncode != 0
  assert "does not exist; create it with `sslbench-jax convert`" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_corrupt_image_then_fixed_leaves_no_stale_cache_state(setup, tmp_path):
  # Issue 10: a corrupt image made `features` fail cleanly but left a cache
  # entry whose manifest said "running". Now the failed run's manifest says
  # "interrupted" (and why); fixing the image changes the folder's
  # fingerprint, so the next run removes that dead entry (and says so) and
  # leaves exactly one complete entry, equal to a clean run's output.
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.RandomState(5)
  for i in range(6):
    Image.fromarray(rng.randint(0, 256, (40 + i, 48, 3)).astype(np.uint8)).save(
        images / f"p{i}.jpg", quality=90)
  good = (images / "p4.jpg").read_bytes()
  (images / "p4.jpg").write_bytes(good[:50])
  cache, out = tmp_path / "cache", tmp_path / "f.npz"
  args = ["--weights", setup["weights"], "--images", str(images), "--cache", str(cache),
          "--out", str(out), "--preprocessing", "smoke_32",
          "--batch_size_per_device", "1", "--steps_per_shard", "1", "--num_threads", "1"]
  proc = _cli(*args, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if "error" in l]
  assert len(errors) == 1 and "p4.jpg" in errors[0] and "Traceback" not in proc.stderr
  assert not out.exists()
  entries = os.listdir(cache)
  assert len(entries) == 1
  with open(cache / entries[0] / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["status"] == "interrupted" and "p4.jpg" in manifest["error"]

  (images / "p4.jpg").write_bytes(good)
  proc = _cli(*args)
  assert "removed " + str(cache / entries[0]) in proc.stderr
  assert "an interrupted extraction of an earlier state of" in proc.stderr
  (entry,) = os.listdir(cache)
  with open(cache / entry / "manifest.json") as f:
    assert json.load(f)["status"] == "complete"
  fresh = tmp_path / "fresh.npz"
  _cli("--weights", setup["weights"], "--images", str(images), "--out", str(fresh),
       "--preprocessing", "smoke_32", "--batch_size_per_device", "1")  # clean, uncached
  np.testing.assert_array_equal(features_io.load(str(out)).features,
                                features_io.load(str(fresh)).features)


def test_default_options_are_the_flag_defaults():
  """``run``'s defaults and the CLI's are one definition (the flag table)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import command  # pylint: disable=g-import-not-at-top
  assert command.default_options() == dict(
      weights=None, arch=None, images=None, dataset=None, split=None,
      data_dir=None, out=None, cache=None, representation="pre_logits",
      preprocessing=None, dtype="float32", batch_size_per_device=64,
      num_threads=None, decode_backend="threads", steps_per_shard=16,
      coordinator_address=None, num_processes=None, process_id=None,
      progress=True)
  fv = flags.FlagValues()
  command._define_flags(fv)  # pylint: disable=protected-access
  fv(["features", "--dtype=bfloat16", "--noprogress"])
  parsed = {name: fv[name].value for name in command.default_options()}
  assert parsed == dict(command.default_options(), dtype="bfloat16", progress=False)
