"""evaluate: the models of a config extracted in one decode pass per split.

Reference: the same config with ``extraction.models_per_pass=1`` (one pass
per model, i.e. ``sslbench-jax features`` run on each model alone, as
before): the feature files must hold the same arrays and meta, byte for
byte, and results.jsonl the same rows. Three tiny models (random resnet18s,
one of them with another representation) on digits at 32 px.
"""

import json
import logging
import os
import zipfile

import ml_collections
import pytest

from sslbench_jax import evaluate
from sslbench_jax.features import command as features_command
from sslbench_jax.features import extract as extract_lib


def _config(models_per_pass=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  model = dict(arch="resnet18", select=None, allow_missing=None, options={})
  c.models = {"r0": dict(model, checkpoint="random:0"),
              "r1": dict(model, checkpoint="random:1"),
              # its own representation: a second output of the same pass
              "r2": dict(model, checkpoint="random:2", representation="layer3_avg")}
  c.datasets = {"digits": dict(dataset="digits", train_split="train", test_split="test",
                               data_dir=None, preprocessing="smoke_32")}
  c.protocols = {"knn": dict(type="knn", datasets=["digits"], knn_k=[5],
                             knn_metric="cosine")}
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=256, steps_per_shard=4)
  if models_per_pass is not None:
    c.extraction.models_per_pass = models_per_pass
  c.analysis = dict(n_boot=10, n_perm=10)
  return c


def _run(config, workdir):
  """evaluate.run; returns the models of each extract_many pass."""
  passes, real = [], extract_lib.extract_many

  def spy(models, *args, **kwargs):
    passes.append([(s.key.weights_sha256[:8], s.representation) for s in models])
    return real(models, *args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(extract_lib, "extract_many", spy)
    evaluate.run(config, workdir)
  return passes


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  for r in rows:  # when and by which run: the only fields allowed to differ
    r.pop("run_id")
    r.pop("timestamp")
  return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def _members(path):
  # np.savez stamps each zip member with the time: compare the members' bytes.
  with zipfile.ZipFile(path) as z:
    return {name: z.read(name) for name in z.namelist()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multi")
  logger = logging.getLogger("absl")
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logger.addHandler(handler)
  old_level = logger.level
  logger.setLevel(logging.INFO)
  try:
    one = _run(_config(), str(root / "one"))
    pass_logs = [r.getMessage() for r in records if "features pass" in r.getMessage()]
    alone = _run(_config(models_per_pass=1), str(root / "alone"))
  finally:
    logger.removeHandler(handler)
    logger.setLevel(old_level)
  return root, one, alone, pass_logs


def test_one_pass_per_split_for_all_models(runs):
  _, one, alone, pass_logs = runs
  # train and test: one pass each, with the three models' feature sets.
  assert [len(p) for p in one] == [3, 3]
  assert sorted(one[0], key=str) == sorted(one[1], key=str)
  assert sorted(r for _, r in one[0]) == ["layer3_avg", "pre_logits", "pre_logits"]
  assert len({w for w, _ in one[0]}) == 3  # three models, not one model three times
  assert [len(p) for p in alone] == [1] * 6
  assert sorted(m for p in alone for m in p) == sorted(m for p in one for m in p)
  assert len(pass_logs) == 2 and all("3 model(s) in one decode pass" in m for m in pass_logs)
  assert "features pass 1/2: digits train (smoke_32)" in pass_logs[0]


def test_features_and_results_equal_one_pass_per_model(runs):
  root, _, _, _ = runs
  files = sorted(os.listdir(root / "one" / "features"))
  assert files == sorted(os.listdir(root / "alone" / "features"))
  assert files == sorted(f"{m}__digits__{s}__{r}.npz" for m, r in (
      ("r0", "pre_logits"), ("r1", "pre_logits"), ("r2", "layer3_avg"))
                         for s in ("train", "test"))
  for name in files:
    a = _members(root / "one" / "features" / name)
    b = _members(root / "alone" / "features" / name)
    assert a == b, name
  assert sorted(os.listdir(root / "one" / "cache")) == sorted(
      os.listdir(root / "alone" / "cache"))
  rows = _rows(root / "one")
  assert {r["model"] for r in rows} == {"r0", "r1", "r2"}
  assert rows == _rows(root / "alone")


def test_done_steps_extract_nothing_new_steps_only_their_models(runs, tmp_path):
  root, _, _, _ = runs
  assert _run(_config(), str(root / "one")) == []  # every step done: no pass at all
  config = _config()
  config.protocols.knn_euclidean = dict(type="knn", datasets=["digits"], knn_k=[5],
                                        knn_metric="euclidean")
  config.models.r0.protocols = ["knn"]
  config.models.r2.protocols = ["knn"]
  passes = _run(config, str(root / "one"))
  # Only r1's new step runs: its two splits (read back from the cache).
  assert [len(p) for p in passes] == [1, 1]
  assert passes[0] == passes[1] and passes[0][0][1] == "pre_logits"
  rows = _rows(root / "one")
  assert {(r["model"], r["protocol"]) for r in rows} == {
      ("r0", "knn"), ("r1", "knn"), ("r2", "knn"), ("r1", "knn_euclidean")}


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "8"])
def test_models_per_pass_is_validated(value):
  with pytest.raises(ValueError, match="config.extraction.models_per_pass"):
    evaluate.validate(_config(models_per_pass=value))


def test_run_many_refuses_models_of_different_sources():
  opts = dict(features_command.default_options(), dataset="digits", split="train",
              cache="/nonexistent", weights="a.npz")
  with pytest.raises(ValueError, match="--split"):
    features_command.run_many([opts, dict(opts, split="test", weights="b.npz")])
  with pytest.raises(ValueError, match="at least one"):
    features_command.run_many([])
