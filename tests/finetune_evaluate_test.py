"""A trained protocol through ``evaluate`` end to end: a tiny random ViT
fine-tuned on digits (32 px, 1 epoch) by a config entry of type
``finetune_full``; its rows land in results.jsonl with their provenance and a
re-run trains nothing."""

import json
import os

import ml_collections
import pytest

from sslbench_jax import evaluate
from sslbench_jax.finetune import train as train_lib
from sslbench_jax.results import store

FT = dict(type="finetune_full", datasets=["digits"], epochs=1, batch_size=32,
          train_limit=64, test_limit=40, image_size=32, eval_batch_size=16, threads=2,
          head_bn=True, checkpoint_every_steps=1)


def _config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.models = {"vit": dict(arch="vit_small_patch16", checkpoint="random:0", select=None,
                          allow_missing=None,
                          options=dict(patch_size=8, width=32, depth=2, num_heads=2,
                                       img_size=32))}
  c.datasets = {"digits": dict(dataset="digits", train_split="train", test_split="test",
                               data_dir=None, preprocessing="smoke_32")}
  c.protocols = {"ft": dict(FT)}
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=64, steps_per_shard=4)
  c.analysis = dict(n_boot=10, n_perm=10)
  return c


def test_finetune_protocol_through_evaluate(tmp_path):
  workdir = str(tmp_path / "run")
  evaluate.run(_config(), workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "results.jsonl"))]
  ft = [r for r in rows if json.loads(r["hparams"]).get("protocol_type") == "finetune_full"]
  assert sorted(r["metric"] for r in ft) == ["top1", "top5"]
  # The run's own directory (checkpoints, metrics, result) under the workdir.
  run_dirs = [d for d, _, files in os.walk(workdir) if "result.json" in files]
  assert len(run_dirs) == 1
  with open(os.path.join(run_dirs[0], "result.json")) as f:
    result = json.load(f)
  assert os.path.isdir(os.path.join(run_dirs[0], "checkpoints"))
  assert result["steps"] == 2 and result["n_train"] == 64 and result["n_test"] == 40
  for r in ft:
    h = json.loads(r["hparams"])
    assert r["value"] == result[r["metric"]]
    assert (r["model"], r["dataset"], r["split"], r["n_examples"], r["seed"],
            r["device_count"]) == ("vit", "digits", "test", 40, 0, result["device_count"])
    assert r["checkpoint_sha256"] == result["weights_sha256"] and r["step"] and r["run_id"]
    # Provenance: the recipe as run (the study's ViT extras derived), precision,
    # label fraction / subset seed (none: not few-shot), the checkpoint, the
    # training split.
    assert (h["epochs"], h["batch_size"], h["optimizer"], h["lr"], h["layer_decay"],
            h["label_smoothing"], h["drop_path"], h["head_bn"], h["precision"],
            h["label_fraction"], h["subset_seed"], h["n_train"], h["image_size"]) == (
                1, 32, "sgd", 0.1, 0.65, 0.1, 0.2, True, "float32", None, None, 64, 32)
    assert h["checkpoint"] == "random:0" and h["train_split"] == "train"

  # A re-run finds the step done: no training, no new rows, result untouched.
  mtime = os.path.getmtime(os.path.join(run_dirs[0], "result.json"))
  with pytest.MonkeyPatch.context() as mp:
    def refuse(*args, **kwargs):
      raise AssertionError("a finished fine-tuning step was run again")
    mp.setattr(train_lib, "run", refuse)
    evaluate.run(_config(), workdir)
  again = [json.loads(l) for l in open(os.path.join(workdir, "results.jsonl"))]
  assert again == rows
  assert os.path.getmtime(os.path.join(run_dirs[0], "result.json")) == mtime
  assert len(store.read_results(os.path.join(workdir, "results.jsonl"))) == len(rows)


def test_closer_look_config_lists_the_trained_protocols():
  import importlib.util  # pylint: disable=import-outside-toplevel
  from sslbench_jax.protocols import registry  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "closer_look.py")
  spec = importlib.util.spec_from_file_location("closer_look", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base = module.get_config("checkpoints=/ckpt")
  config = module.get_config("checkpoints=/ckpt,finetune=true")
  evaluate.validate(config)
  added = sorted(set(config.protocols) - set(base.protocols))
  assert added == ["fewshot_finetune_10pct", "fewshot_finetune_1pct", "finetune",
                   "linear_aug", "linear_aug_bn"]
  types = {n: config.protocols[n].type for n in added}
  assert types == {"fewshot_finetune_10pct": "finetune_fewshot",
                   "fewshot_finetune_1pct": "finetune_fewshot", "finetune": "finetune_full",
                   "linear_aug": "finetune_linear_aug", "linear_aug_bn": "finetune_linear_aug"}
  # Few-shot on ImageNet only (the study's run_fewshot_finetuning.py), at 1 % / 10 %.
  for name, fraction in (("fewshot_finetune_1pct", 0.01), ("fewshot_finetune_10pct", 0.1)):
    p = config.protocols[name]
    assert list(p.datasets) == ["imagenet"]
    opts = registry.options_from_mapping(
        p.type, {k: v for k, v in p.items() if k not in ("type", "datasets")}, name)
    assert (opts.label_fraction, opts.fewshot_setup) == (fraction, "byol2")
  assert sorted(config.protocols["finetune"].datasets) == sorted(config.datasets)
  # Without imagenet there is no few-shot entry.
  small = module.get_config("checkpoints=/c,datasets=cub,finetune=true")
  assert not any(n.startswith("fewshot") for n in small.protocols)
