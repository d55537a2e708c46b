"""evaluate's rows and feature files pinned across the architecture refactor (issue 11).

The fixture ``tests/fixtures/evaluate_golden.json`` was produced by the code
at HEAD dfa8044 (before ``evaluate`` became an orchestrator of library calls)
by running this file with ``SSLBENCH_WRITE_GOLDEN=1``: every row of
``results.jsonl`` (without ``run_id`` / ``timestamp``, the only fields that
differ between runs), the sha256 of every member of every feature file (its
arrays and its meta), and the finished step names. The refactored code must
reproduce them exactly: same numbers, same provenance, same files.

The config: two random ResNet-18s (one at another representation, restricted
to two protocols) on scikit-learn's digits at 32 px, every cached-feature
protocol type (kNN with two k and with z-scoring, the linear sweep, L-BFGS
logistic regression, least squares, few-shot), with typed option values
(which the old code accepted as well as CLI strings).
"""

import hashlib
import json
import os
import zipfile

import ml_collections
import pytest

from sslbench_jax import evaluate

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "evaluate_golden.json")


def _config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  model = dict(arch="resnet18", select=None, allow_missing=None, options={})
  c.models = {"r0": dict(model, checkpoint="random:0"),
              "r1": dict(model, checkpoint="random:1", representation="layer3_avg",
                         protocols=["knn", "fewshot"])}
  c.datasets = {"digits": dict(dataset="digits", train_split="train", test_split="test",
                               data_dir=None, preprocessing="smoke_32")}
  c.protocols = {
      "knn": dict(type="knn", datasets=["digits"], knn_k=[3, 5], knn_metric="cosine"),
      "knn_z": dict(type="knn", datasets=["digits"], knn_k=[5], knn_metric="euclidean",
                    zscore=True),
      "linear": dict(type="linear", datasets=["digits"], lr=[0.1, 1.0],
                     weight_decay=[0.0], batchnorm=[False, True], epochs=2,
                     batch_size=256, warmup_epochs=0),
      "logreg": dict(type="logreg", datasets=["digits"], c=[0.1, 10.0], max_iter=50),
      "leastsquares": dict(type="leastsquares", datasets=["digits"], l2=[1.0, 100.0]),
      "fewshot": dict(type="fewshot", datasets=["digits"], setups=["1shot", "5shot"],
                      fewshot_probes=["knn", "leastsquares"], tries=2),
  }
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=256, steps_per_shard=4)
  c.analysis = dict(n_boot=10, n_perm=10)
  return c


def _observed(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  for r in rows:  # when and by which run: the only fields allowed to differ
    r.pop("run_id")
    r.pop("timestamp")
  rows.sort(key=lambda r: json.dumps(r, sort_keys=True))
  features = {}
  for name in sorted(os.listdir(os.path.join(workdir, "features"))):
    # np.savez stamps each zip member with the time: hash the members' bytes.
    with zipfile.ZipFile(os.path.join(workdir, "features", name)) as z:
      features[name] = {m: hashlib.sha256(z.read(m)).hexdigest() for m in sorted(z.namelist())}
  with open(os.path.join(workdir, "done.json")) as f:
    steps = sorted(json.load(f))
  return dict(rows=rows, features=features, steps=steps)


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("golden"))
  evaluate.run(_config(), workdir)
  got = _observed(workdir)
  if os.environ.get("SSLBENCH_WRITE_GOLDEN"):
    with open(FIXTURE, "w") as f:
      json.dump(got, f, indent=1, sort_keys=True)
      f.write("\n")
  return got


@pytest.fixture(scope="module")
def golden():
  with open(FIXTURE) as f:
    return json.load(f)


def test_steps_are_the_pinned_ones(observed, golden):
  assert observed["steps"] == golden["steps"]
  assert len(golden["steps"]) == 6 + 2  # r0: every protocol; r1: knn, fewshot


def test_feature_files_are_byte_identical(observed, golden):
  assert sorted(observed["features"]) == sorted(golden["features"])
  for name, members in golden["features"].items():
    assert observed["features"][name] == members, name


def test_rows_are_identical(observed, golden):
  assert len(observed["rows"]) == len(golden["rows"]) > 0
  for got, want in zip(observed["rows"], golden["rows"]):
    assert got == want
  protocols = {r["protocol"] for r in golden["rows"]}
  assert {"knn_k3", "knn_k5", "knn_z", "linear", "logreg", "leastsquares",
          "fewshot_knn_1shot", "fewshot_leastsquares_5shot"} <= protocols
