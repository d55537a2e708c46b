"""evaluate dispatches a protocol that consumes images (fine-tuning's kind).

A tiny protocol registered in the protocol table for this test only
(``consumes="images"``) records what evaluate hands it: the train / test
splits as ``ImageInputs`` (the dataset entry's, with the model's own
preprocessing), the converted weights (path and sidecar), and a per-step
working directory it owns (checkpoints, resume). Its rows are stored like any
protocol's, labelled by the config entry; no feature is extracted for it; a
re-run skips it; a changed option runs it again in the same directory.
"""

import dataclasses
import json
import os

import ml_collections
import numpy as np
import pytest

from sslbench_jax import evaluate
from sslbench_jax.backbones import weights as weights_lib
from sslbench_jax.protocols import base
from sslbench_jax.protocols import registry


@dataclasses.dataclass(frozen=True)
class _Options:
  epochs: int = base.option(1, "epochs", check=(lambda x: x > 0, "> 0"))

  def __post_init__(self):
    base.check_options(self)


_CALLS = []


def _run(train, test, options, *, mesh=None, context=base.RunContext()):
  del mesh
  variables, meta = weights_lib.load_variables(context.weights_path)
  leaves = sum(np.asarray(x).size for x in _leaves(variables))
  # The step's own directory: what a resumable trainer keeps there.
  os.makedirs(context.workdir, exist_ok=True)
  marker = os.path.join(context.workdir, "resume.txt")
  resumed = os.path.exists(marker)
  with open(marker, "a") as f:
    f.write(f"epochs={options.epochs}\n")
  _CALLS.append(dict(train=train, test=test, options=options, context=context,
                     meta=meta, resumed=resumed))
  row = dict(model=context.model, dataset=test.dataset, split=test.split,
             protocol="fake_images", hparams=dict(epochs=options.epochs),
             metric="top1", value=float(options.epochs), n_examples=int(leaves),
             seed=context.seed, device_count=1,
             checkpoint_sha256=meta.get("checkpoint_sha256") or meta["weights_sha256"])
  return base.ProtocolResult([row])


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


_FAKE = base.Protocol("fake_images", "images", _Options, _run, "this test")


@pytest.fixture(autouse=True)
def fake_protocol(monkeypatch):
  monkeypatch.setitem(registry.PROTOCOLS, "fake_images", _FAKE)
  _CALLS.clear()


def _config(epochs=2):
  c = ml_collections.ConfigDict()
  c.seed = 5
  c.models = {"r": dict(arch="resnet18", checkpoint="random:0", select=None,
                        allow_missing=None, options={}, preprocessing="smoke_32")}
  c.datasets = {"digits": dict(dataset="digits", train_split="train", test_split="test",
                               data_dir=None, preprocessing=None)}
  c.protocols = {"ft": dict(type="fake_images", datasets=["digits"], epochs=epochs)}
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=8, steps_per_shard=2)
  c.analysis = dict(n_boot=5, n_perm=5)
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_images_protocol_gets_splits_weights_and_its_own_workdir(tmp_path):
  workdir = str(tmp_path / "work")
  summary = evaluate.run(_config(), workdir)
  [call] = _CALLS
  # The dataset entry's splits, with the model's own preprocessing.
  assert call["train"] == base.ImageInputs("digits", "train", None, "smoke_32")
  assert call["test"] == base.ImageInputs("digits", "test", None, "smoke_32")
  ctx = call["context"]
  assert ctx.weights_path == os.path.join(workdir, "weights", "r.npz")
  assert dict(ctx.weights_meta) == call["meta"]  # the sidecar, read once by evaluate
  assert ctx.workdir == os.path.join(workdir, "steps", "r", "ft", "digits")
  assert (ctx.model, ctx.dataset, ctx.seed) == ("r", "digits", 5)
  assert call["options"] == _Options(epochs=2) and not call["resumed"]
  # No feature set is made for a protocol that reads images.
  assert not os.path.exists(os.path.join(workdir, "features"))
  assert not os.path.exists(os.path.join(workdir, "cache"))
  [row] = _rows(workdir)
  assert summary["new_rows"] == 1
  assert (row["step"], row["run_id"]) == ("r/ft/digits", summary["run_id"])
  assert row["protocol"] == "ft" and row["value"] == 2.0
  hp = json.loads(row["hparams"]) if isinstance(row["hparams"], str) else row["hparams"]
  assert hp["protocol_type"] == "fake_images" and hp["epochs"] == 2
  assert (hp["train_dataset"], hp["train_split"], hp["checkpoint"]) == (
      "digits", "train", "random:0")
  assert "representation" not in hp
  # Every parameter of the converted ResNet-18 reached the protocol.
  variables, _ = weights_lib.load_variables(ctx.weights_path)
  assert row["n_examples"] == sum(np.asarray(x).size for x in _leaves(variables))
  with open(os.path.join(workdir, "done.json")) as f:
    done = json.load(f)
  assert done["r/ft/digits"]["inputs"]["protocol"] == dict(type="fake_images",
                                                           options=dict(epochs=2))
  assert "representation" not in done["r/ft/digits"]["inputs"]

  # Re-run: done for the same inputs, the protocol is not called.
  assert evaluate.run(_config(), workdir)["new_rows"] == 0 and len(_CALLS) == 1
  # Another option: runs again, in the same directory (a trainer resumes there).
  again = evaluate.run(_config(epochs=3), workdir)
  assert again["new_rows"] == 1 and len(_CALLS) == 2 and _CALLS[1]["resumed"]
  assert [r["value"] for r in _rows(workdir)] == [3.0]


def test_images_protocol_options_are_validated(tmp_path):
  c = _config(epochs=0)
  with pytest.raises(ValueError, match=r"config.protocols.ft.epochs=0 must be > 0"):
    evaluate.run(c, str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "work")
