"""The trained protocols as protocol-table entries (``finetune/protocol.py``):
defaults = the study's recipe (its CSV files), run() rows with provenance, a
re-run does nothing, the CLI's ``--results`` rows are the same rows."""

import csv
import dataclasses
import json
import os

import pytest

from conftest import SHARED
from sslbench_jax.backbones import random_init
from sslbench_jax.finetune import command
from sslbench_jax.finetune import protocol
from sslbench_jax.protocols import base
from sslbench_jax.results import store

REFERENCE = os.path.join(SHARED, "reference")
SMALL = dict(image_size=32, eval_batch_size=16, threads=2, test_limit=40)


def _weights(tmp_path):
  path = str(tmp_path / "rn.npz")
  random_init.write("resnet18", 0, path, {"stage_sizes": (1, 1)})
  return path


def _digits():
  return (base.ImageInputs("digits", "train", None, "smoke_32"),
          base.ImageInputs("digits", "test", None, "smoke_32"))


def test_defaults_are_the_studys_recipe():
  # protocol_hyperparameters_from_code.csv: linear probe SGD m 0.9 wd 0, lr 0.1,
  # batch 1024, 100 epochs, 5 warm-up, clip 0.5, no smoothing; fine-tuning the
  # same at batch 256; ViT-B/16: layer decay 0.65, smoothing 0.1, drop path 0.2.
  lin = protocol.to_recipe(protocol.LinearAugOptions(), "resnet")
  assert (lin.protocol, lin.optimizer, lin.lr, lin.momentum, lin.weight_decay,
          lin.batch_size, lin.epochs, lin.warmup_epochs, lin.clip_norm,
          lin.label_smoothing, lin.head_bn, lin.crop_scale_min) == (
              "linear_aug", "sgd", 0.1, 0.9, 0.0, 1024, 100, 5, 0.5, 0.0, False, 0.08)
  assert lin.abs_lr() == pytest.approx(0.4)  # "0.1*1024/256 = 0.4"
  for family, extras in (("resnet", (1.0, 0.0, 0.0)), ("vit", (0.65, 0.1, 0.2))):
    full = protocol.to_recipe(protocol.FullOptions(), family)
    assert (full.protocol, full.optimizer, full.lr, full.head_lr, full.momentum,
            full.weight_decay, full.batch_size, full.epochs, full.warmup_epochs,
            full.clip_norm) == ("full", "sgd", 0.1, None, 0.9, 0.0, 256, 100, 5, 0.5)
    assert (full.layer_decay, full.label_smoothing, full.drop_path) == extras
    assert full.abs_lr() == pytest.approx(0.1)  # "256 -> abs_lr 0.1"
  # AdamW (MAE / BEiT fine-tuning): lr 5e-4, wd 0.05, betas (0.9, 0.999).
  adamw = protocol.to_recipe(protocol.FullOptions(optimizer="adamw"), "vit")
  assert (adamw.lr, adamw.weight_decay, adamw.betas, adamw.layer_decay) == (
      5e-4, 0.05, (0.9, 0.999), 0.65)
  # fewshot_setups.csv, every row; cosine without warm-up, batch 256.
  with open(os.path.join(REFERENCE, "fewshot_setups.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 5
  for row in rows:
    fractions = (0.1, 0.01) if " or " in row["label_fraction"] else (
        float(row["label_fraction"]),)
    for frac in fractions:
      r = protocol.to_recipe(protocol.FewshotOptions(
          fewshot_setup=row["setup"], label_fraction=frac), "resnet")
      assert (r.lr, r.head_lr, r.epochs) == (
          float(row["lr_backbone"]), float(row["lr_head"]), int(row["epochs"])), row
      assert (r.warmup_epochs, r.label_fraction, r.subset_seed, r.batch_size) == (
          0, frac, 42, 256)
  # The CLI's default setup (run_fewshot_finetuning.py).
  assert protocol.FewshotOptions().fewshot_setup == "byol2"
  # A shortened run keeps the warm-up's share, >= 1 epoch.
  assert protocol.to_recipe(protocol.FullOptions(epochs=10), "resnet").warmup_epochs == 1


def test_options_are_typed_and_checked():
  with pytest.raises(ValueError, match="label_fraction"):
    protocol.FewshotOptions(label_fraction=0.5)
  with pytest.raises(ValueError, match="lr"):
    protocol.FullOptions(lr=-0.1)
  with pytest.raises(ValueError, match="dtype"):
    protocol.LinearAugOptions(dtype="float16")
  with pytest.raises(ValueError, match="frozen_bn"):
    protocol.LinearAugOptions(frozen_bn="train")
  with pytest.raises(dataclasses.FrozenInstanceError):
    protocol.FullOptions().epochs = 3  # type: ignore[misc]
  # Entries of the table: images in, the recipe's options type.
  for p, opts in ((protocol.LINEAR_AUG, protocol.LinearAugOptions),
                  (protocol.FULL, protocol.FullOptions),
                  (protocol.FEWSHOT, protocol.FewshotOptions)):
    assert p.consumes == "images" and p.options is opts and p.run is protocol.run
    assert p.name == "finetune_" + protocol.to_recipe(opts(), "resnet").protocol


def test_cli_flags_are_the_options_and_run_config_maps_them():
  # Flag strings -> the protocol's typed options (what `finetune` parses).
  o = command.options("fewshot", {"label_fraction": "0.1", "epochs": "3", "lr": None,
                                  "param_sharding": "fsdp", "head_bn": True})
  assert o == protocol.FewshotOptions(label_fraction=0.1, epochs=3, param_sharding="fsdp",
                                      head_bn=True)
  with pytest.raises(ValueError, match="--frozen_bn is not an option of --protocol full"):
    command.options("full", {"frozen_bn": "update"})
  with pytest.raises(ValueError, match="--lr"):
    command.options("full", {"lr": "fast"})
  with pytest.raises(ValueError, match="--protocol"):
    command.options("probe", {})
  assert set(command.option_fields()) == {
      f.name for cls in (protocol.LinearAugOptions, protocol.FullOptions,
                         protocol.FewshotOptions) for f in dataclasses.fields(cls)}
  # Options + inputs + context -> the run: splits, preset, recipe, run fields.
  cfg = protocol.run_config(
      base.ImageInputs("digits", "train", "/d", None),
      base.ImageInputs("digits", "test", "/d", "smoke_32"),
      protocol.FullOptions(param_sharding="fsdp", model_axis_size=2, dtype="bfloat16",
                           image_size=48, epochs=4),
      base.RunContext(weights_path="w.npz", workdir="/tmp/x", seed=5,
                      weights_meta={"arch": "vit_base_patch16"}))
  assert (cfg.dataset, cfg.train_split, cfg.test_split, cfg.data_dir, cfg.preprocessing,
          cfg.weights, cfg.workdir) == ("digits", "train", "test", "/d", "smoke_32",
                                        "w.npz", "/tmp/x")
  assert (cfg.param_sharding, cfg.model_axis_size, cfg.dtype, cfg.image_size) == (
      "fsdp", 2, "bfloat16", 48)
  r = cfg.recipe
  assert (r.protocol, r.epochs, r.warmup_epochs, r.seed, r.layer_decay, r.drop_path) == (
      "full", 4, 1, 5, 0.65, 0.2)


def test_bad_inputs_name_the_problem(tmp_path):
  w = _weights(tmp_path)
  train, test = _digits()
  ctx = base.RunContext(model="m", workdir=str(tmp_path / "run"), weights_path=w)
  with pytest.raises(ValueError, match="one dataset"):
    protocol.run(train, dataclasses.replace(test, dataset="cifar10"),
                 protocol.FullOptions(), context=ctx)
  with pytest.raises(ValueError, match="preprocessing"):
    protocol.run(train, dataclasses.replace(test, preprocessing="imagenet"),
                 protocol.FullOptions(), context=ctx)
  with pytest.raises(ValueError, match="workdir"):
    protocol.run(train, test, protocol.FullOptions(),
                 context=dataclasses.replace(ctx, workdir=None))
  with pytest.raises(ValueError, match="weights_path"):
    protocol.run(train, test, protocol.FullOptions(),
                 context=dataclasses.replace(ctx, weights_path=None))
  assert not os.path.exists(tmp_path / "run")


def test_full_run_rows_have_provenance_rerun_does_nothing_cli_same_rows(tmp_path):
  w = _weights(tmp_path)
  train, test = _digits()
  opts = protocol.FullOptions(epochs=1, batch_size=32, train_limit=64, head_bn=True,
                              **SMALL)
  run_dir = str(tmp_path / "run")
  ctx = base.RunContext(model="rn", dataset="digits", seed=3, workdir=run_dir,
                        weights_path=w, progress=False)
  res = protocol.run(train, test, opts, mesh=None, context=ctx)
  (digest,) = os.listdir(run_dir)  # one directory per configuration
  run_dir = os.path.join(run_dir, digest)
  with open(os.path.join(run_dir, "result.json")) as f:
    result = json.load(f)
  assert [r["metric"] for r in res.rows] == ["top1", "top5"]
  assert res.scores == {"finetune_full": {"top1": result["top1"], "top5": result["top5"]}}
  for row in res.rows:
    store.normalize_row(row)  # a valid results-store row
    assert row["value"] == result[row["metric"]]
    assert (row["model"], row["dataset"], row["split"], row["protocol"], row["seed"],
            row["n_examples"], row["device_count"]) == (
                "rn", "digits", "test", "finetune_full", 3, 40, result["device_count"])
    h = row["hparams"]
    assert (h["epochs"], h["batch_size"], h["optimizer"], h["lr"], h["layer_decay"],
            h["label_fraction"], h["subset_seed"], h["precision"], h["head_bn"],
            h["n_train"], h["steps"], h["seed"]) == (
                1, 32, "sgd", 0.1, 1.0, None, None, "float32", True, 64, 2, 3)
  # Re-running on the finished directory trains nothing and gives the same rows.
  mtime = os.path.getmtime(os.path.join(run_dir, "result.json"))
  again = protocol.run(train, test, opts, context=ctx)
  assert os.path.getmtime(os.path.join(run_dir, "result.json")) == mtime
  assert again.rows == res.rows
  # Another option (what evaluate does when a config entry changes): a new run
  # next to the finished one, not a refusal.
  other = protocol.run(train, test, dataclasses.replace(opts, test_limit=20), context=ctx)
  assert len(os.listdir(ctx.workdir)) == 2 and other.rows[0]["n_examples"] == 20
  # The CLI's --results: the same rows (model = the weights' file stem).
  results = str(tmp_path / "store.jsonl")
  command.run({"weights": w, "dataset": "digits", "protocol": "full", "epochs": 1,
               "batch_size": 32, "train_limit": 64, "head_bn": True, "seed": 3,
               "preprocessing": "smoke_32", "workdir": str(tmp_path / "cli"),
               "results": results, "progress": False, **SMALL})
  stored = store.read_results(results)
  assert len(stored) == 2
  for rec, row in zip(stored, res.rows):
    assert rec["protocol"] == "finetune_full" and rec["model"] == "rn"
    assert json.loads(rec["hparams"]) == row["hparams"]
    assert rec["value"] == row["value"] and rec["checkpoint_sha256"] == row["checkpoint_sha256"]


def test_fewshot_run_trains_on_the_studys_subset(tmp_path):
  w = _weights(tmp_path)
  train, test = _digits()
  opts = protocol.FewshotOptions(label_fraction=0.1, epochs=1, batch_size=64, **SMALL)
  ctx = base.RunContext(model="rn", dataset="digits", workdir=str(tmp_path / "fs"),
                        weights_path=w, progress=False)
  res = protocol.run(train, test, opts, context=ctx)
  h = res.rows[0]["hparams"]
  # int(0.1 x 1437 / 10) = 14 per class of the 1,437 digits training images.
  assert h["n_train"] == 140 and h["steps"] == 140 // 64
  assert (h["label_fraction"], h["subset_seed"], h["fewshot_setup"], h["lr"],
          h["head_lr"], h["warmup_epochs"]) == (0.1, 42, "byol2", 0.1, 0.1, 0)
  assert res.rows[0]["protocol"] == "finetune_fewshot"
