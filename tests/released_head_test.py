"""Released linear heads: written in each framework's own names, converted, scored.

Each head file is laid out as its framework's code saves it (names read from
that code: DINO ``eval_linear.py``'s DDP-wrapped ``LinearClassifier`` under
``state_dict``, SwAV ``eval_linear.py``'s ``RegLog``, MoCo ``main_lincls.py``'s
whole torchvision ResNet with its ``fc``, BYOL's Haiku ``classifier``,
SimCLR's ``head_supervised`` (TF1) / ``supervised_head`` (TF2)). The stored
head's logits on the converted model's features must equal ``features @ W.T +
b`` computed in NumPy from the tensors as written, and the PyTorch model's own
``fc`` output where the backbone carries it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sslbench_jax import evaluate
from sslbench_jax import plan
from sslbench_jax.backbones import registry
from sslbench_jax.backbones import weights
from sslbench_jax.convert import ConversionError
from sslbench_jax.convert import convert_checkpoint
from sslbench_jax.convert import heads
from sslbench_jax.features import io
from sslbench_jax.protocols import base
from sslbench_jax.protocols import registry as protocol_registry
import convert_byol_test
import convert_simclr_test
import torch_resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_X = np.random.RandomState(0).randn(3, 40, 40, 3).astype(np.float32)


def _features(out):
  variables, meta = weights.load_variables(out)
  model = registry.create_model(meta["arch"], **meta["arch_options"])
  return np.asarray(model.apply(variables, _X, train=False)["pre_logits"], np.float64)


def _stored_head(out):
  arrays, entry = weights.load_released_head(out)
  return heads.from_stored(arrays, entry), entry


def _linear(classes, dim, seed):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(classes, dim, generator=g) * 0.1, torch.randn(classes, generator=g)


def _rn18_file(tmp_path):
  model = torch_resnet.randomize(torch_resnet.resnet("resnet18"), seed=3)
  path = str(tmp_path / "backbone.pth")
  torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, path)
  return path


# --- separate head files (--head), on a ResNet-18 backbone -------------------

def _dino(w, b):  # eval_linear.py: DDP(LinearClassifier).state_dict() under "state_dict"
  return {"epoch": 100, "state_dict": {"module.linear.weight": w, "module.linear.bias": b},
          "optimizer": {"state": {}, "param_groups": []}, "best_acc": 75.3}


def _swav(w, b):  # eval_linear.py RegLog (global_avg, no BN), DDP-wrapped
  return {"epoch": 100, "best_acc": 75.3,
          "state_dict": {"module.linear.weight": w, "module.linear.bias": b}}


def _bare_linear(w, b):  # a hub-style plain state dict without DDP prefix
  return {"linear.weight": w, "linear.bias": b}


@pytest.mark.parametrize("writer", [_dino, _swav, _bare_linear])
def test_head_file_stored_and_logits_equal_numpy(writer, tmp_path):
  w, b = _linear(7, 512, seed=5)
  head_path = str(tmp_path / "linearweights.pth")
  torch.save(writer(w, b), head_path)
  out = str(tmp_path / "w.npz")
  _, meta = convert_checkpoint(_rn18_file(tmp_path), "resnet18", out, head=head_path)
  entry = meta["released_head"]
  assert entry["source_file"] == "linearweights.pth"
  assert entry["source_sha256"] == weights.sha256_file(head_path)
  assert (entry["num_classes"], entry["dim"], entry["representation"]) == (7, 512, "pre_logits")
  assert entry["layout"] == "linear" and not entry["detected_in_checkpoint"]
  with open(out + ".json") as f:
    assert json.load(f)["released_head"] == entry
  # The model's variables stay the backbone's: the head is not one of them.
  variables, _ = weights.load_variables(out)
  assert "released_head" not in variables
  head, _ = _stored_head(out)
  feats = _features(out)
  expected = feats @ w.numpy().astype(np.float64).T + b.numpy()
  np.testing.assert_allclose(head.logits(feats), expected, rtol=1e-5, atol=1e-4)


def test_head_of_wrong_input_size_is_refused(tmp_path):
  w, b = _linear(7, 2048, seed=5)
  head_path = str(tmp_path / "dino_resnet50_linearweights.pth")
  torch.save(_dino(w, b), head_path)
  out = str(tmp_path / "w.npz")
  with pytest.raises(ConversionError, match=r"takes 2048-d input but the model's "
                     r"pre_logits is 512-d") as e:
    convert_checkpoint(_rn18_file(tmp_path), "resnet18", out, head=head_path)
  assert "\n" not in str(e.value)
  assert not os.path.exists(out)


def test_head_file_without_a_head_and_bn_head_are_refused(tmp_path):
  path = str(tmp_path / "nohead.pth")
  torch.save({"state_dict": {"module.proj.weight": torch.zeros(3, 4)}}, path)
  with pytest.raises(ConversionError, match="no linear head in .*nohead.pth"):
    heads.read_head_file(path)
  w, b = _linear(7, 8192, seed=1)
  bn = str(tmp_path / "swav_bn.pth")
  torch.save({"state_dict": {"module.linear.weight": w, "module.linear.bias": b,
                             "module.bn.running_mean": torch.zeros(2048)}}, bn)
  with pytest.raises(ConversionError, match="BatchNorm before it"):
    heads.read_head_file(bn)


def test_convert_cli_head_flag_and_bad_head_exit_2(tmp_path):
  w, b = _linear(5, 512, seed=2)
  head_path = str(tmp_path / "head.pth")
  torch.save(_dino(w, b), head_path)
  ckpt = _rn18_file(tmp_path)
  cmd = [sys.executable, "-m", "sslbench_jax.cli", "convert", "--checkpoint", ckpt,
         "--arch", "resnet18"]
  ok = subprocess.run(cmd + ["--out", str(tmp_path / "a.npz"), "--head", head_path],
                      capture_output=True, text=True, cwd=ROOT, check=False)
  assert ok.returncode == 0, ok.stderr
  assert "released head state_dict.module.linear.weight (5 classes on pre_logits)" in ok.stdout
  bad = str(tmp_path / "bad.pth")
  torch.save(_dino(*_linear(5, 300, seed=2)), bad)
  res = subprocess.run(cmd + ["--out", str(tmp_path / "b.npz"), "--head", bad],
                       capture_output=True, text=True, cwd=ROOT, check=False)
  assert res.returncode == 2
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "300-d input" in errors[0]
  assert not os.path.exists(tmp_path / "b.npz")


# --- heads the checkpoint itself carries (detected), on ResNet-50 ------------

def test_moco_lincls_full_checkpoint_gives_backbone_and_head(tmp_path):
  # main_lincls.py: the whole torchvision ResNet-50 (DDP) with its trained fc.
  model = torch_resnet.randomize(torch_resnet.resnet("resnet50", num_classes=1000), seed=8)
  w, b = _linear(1000, 2048, seed=9)
  with torch.no_grad():
    model.fc.weight.copy_(w)
    model.fc.bias.copy_(b)
  state = {"module." + k: v for k, v in model.state_dict().items()}
  path = str(tmp_path / "moco_v2_800ep_lincls.pth.tar")
  torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state, "best_acc1": 71.1,
              "optimizer": {"state": {}, "param_groups": []}}, path)
  out = str(tmp_path / "moco.npz")
  _, meta = convert_checkpoint(path, "resnet50", out)
  entry = meta["released_head"]
  assert entry["detected_in_checkpoint"] and entry["layout"] == "fc"
  assert entry["weight_key"] == "state_dict.module.fc.weight"
  assert entry["source_sha256"] == meta["checkpoint_sha256"]
  head, _ = _stored_head(out)
  feats = _features(out)
  np.testing.assert_allclose(head.logits(feats),
                             feats @ w.numpy().astype(np.float64).T + b.numpy(),
                             rtol=1e-5, atol=1e-4)
  # The backbone too: features and logits are the PyTorch module's.
  x = torch.from_numpy(_X.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    ref_feats, ref_logits = model.features(x).numpy(), model(x).numpy()
  np.testing.assert_allclose(feats, ref_feats, atol=1e-4, rtol=0)
  np.testing.assert_allclose(head.logits(feats), ref_logits, atol=1e-4, rtol=0)


def test_moco_v1_projection_is_not_a_released_head(tmp_path):
  model = torch_resnet.randomize(torch_resnet.resnet("resnet18"), seed=8)
  state = {"module.encoder_q." + k: v for k, v in model.state_dict().items()
           if not k.startswith("fc.")}
  state["module.encoder_q.fc.weight"], state["module.encoder_q.fc.bias"] = _linear(128, 512, 1)
  path = str(tmp_path / "moco_v1_200ep_pretrain.pth.tar")
  torch.save({"state_dict": state}, path)
  _, meta = convert_checkpoint(path, "resnet18", str(tmp_path / "m.npz"),
                               options={"num_classes": None})
  assert "released_head" not in meta


def test_byol_pickle_classifier_is_detected(tmp_path):
  online = torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed=11)
  target = torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed=12)
  rs = np.random.RandomState(4)
  trees = []
  for m, scale in ((online, 0.1), (target, 5.0)):
    params, state = convert_byol_test._haiku_trees(m)  # pylint: disable=protected-access
    params["classifier"] = {"w": (rs.randn(2048, 1000) * scale).astype(np.float32),
                            "b": rs.randn(1000).astype(np.float32)}
    trees.append((params, state))
  path = str(tmp_path / "pretrain_res50x1.pkl")
  convert_byol_test._write_experiment_state(path, *trees)  # pylint: disable=protected-access
  out = str(tmp_path / "byol.npz")
  _, meta = convert_checkpoint(path, "resnet50", out)
  assert meta["released_head"]["weight_key"] == "online.classifier.w"
  head, _ = _stored_head(out)
  feats = _features(out)
  w, b = trees[0][0]["classifier"]["w"], trees[0][0]["classifier"]["b"]  # Haiku (D, C)
  np.testing.assert_allclose(head.logits(feats), feats @ w.astype(np.float64) + b,
                             rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("version", ["tf1", "tf2"])
def test_simclr_bundle_supervised_head_is_detected(version, tmp_path):
  model = torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed=21)
  rs = np.random.RandomState(6)
  kernel = (rs.randn(2048, 1000) * 0.1).astype(np.float32)  # TF Dense: (in, out)
  bias = rs.randn(1000).astype(np.float32)
  if version == "tf1":
    tensors = convert_simclr_test.simclr_v1_tensors(model)
    name = "head_supervised/linear_layer/dense/"
    tensors[name + "kernel"], tensors[name + "bias"] = kernel, bias
  else:
    tensors = convert_simclr_test.simclr_v2_tf2_tensors(model)
    name, suffix = "model/supervised_head/linear_layer/dense/", "/.ATTRIBUTES/VARIABLE_VALUE"
    tensors[name + "kernel" + suffix], tensors[name + "bias" + suffix] = kernel, bias
  index = convert_simclr_test.write_bundle(str(tmp_path / "model.ckpt-1"), tensors)
  out = str(tmp_path / "simclr.npz")
  _, meta = convert_checkpoint(index, "resnet50", out)
  assert meta["released_head"]["layout"] == f"simclr_{version}"
  head, _ = _stored_head(out)
  feats = _features(out)
  np.testing.assert_allclose(head.logits(feats), feats @ kernel.astype(np.float64) + bias,
                             rtol=1e-5, atol=1e-3)


# --- scoring: the released_head rows equal NumPy's ----------------------------

def test_released_head_rows_score_like_numpy(tmp_path):
  w, b = _linear(10, 512, seed=5)
  head_path = str(tmp_path / "head.pth")
  torch.save(_dino(w, b), head_path)
  out = str(tmp_path / "w.npz")
  convert_checkpoint(_rn18_file(tmp_path), "resnet18", out, head=head_path)
  rs = np.random.RandomState(1)
  feats = rs.randn(50, 512).astype(np.float32)
  labels = rs.randint(0, 10, 50)
  test = str(tmp_path / "test.npz")
  io.save(test, io.FeatureSet(feats, labels, np.array([str(i) for i in range(50)]),
                              {"dataset": "folder", "split": "test"}))
  protocol = protocol_registry.get("released_head")
  rows = protocol.run(None, base.load_features(test), protocol.options(),
                      context=base.RunContext(model="m", dataset="folder",
                                              weights_path=out)).rows
  got = {r["metric"]: r["value"] for r in rows}
  logits = feats.astype(np.float64) @ w.numpy().T + b.numpy()
  top5 = np.argsort(-logits, 1)[:, :5]
  assert got["top1"] == pytest.approx(100 * np.mean(logits.argmax(1) == labels))
  assert got["top5"] == pytest.approx(100 * np.mean((top5 == labels[:, None]).any(1)))
  assert all(r["n_examples"] == 50 for r in rows)
  assert rows[0]["hparams"]["head_sha256"] == weights.sha256_file(head_path)


# --- evaluate config: head / preprocessing model keys -------------------------

def _lottery_config(arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "benchmark_lottery", os.path.join(ROOT, "configs", "benchmark_lottery.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_config_head_and_preprocessing_are_checked(tmp_path):
  config = _lottery_config("checkpoints=/ckpt,models=dino_rn50+moco_v2_800ep_rn50")
  evaluate.validate(config)
  bad = _lottery_config("checkpoints=/ckpt,models=dino_rn50")
  bad.models.dino_rn50.preprocessing = "no_such_preset"
  with pytest.raises(ValueError, match=r"config.models.dino_rn50.preprocessing "
                     "'no_such_preset' unknown"):
    evaluate.validate(bad)
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  torch.save({}, str(ckpt / "dino_resnet50_pretrain.pth"))
  config = _lottery_config(f"checkpoints={ckpt},models=dino_rn50")
  with pytest.raises(FileNotFoundError, match=r"config.models.dino_rn50.head: head file "
                     r".*dino_resnet50_linearweights.pth does not exist"):
    evaluate.check_inputs(config)


def test_model_preprocessing_changes_the_step_inputs():
  config = _lottery_config("checkpoints=/ckpt,models=simclr_v2_rn50,variants=imagenet_r")
  m, d = config.models.simclr_v2_rn50, config.datasets.imagenet_r
  p = config.protocols.linear
  with_own = plan.step_inputs(config, m, {}, p, d)
  assert with_own["train"]["preprocessing"] == with_own["test"]["preprocessing"] == "no_norm"
  m.preprocessing = None
  plain = plan.step_inputs(config, m, {}, p, d)
  assert plain["test"]["preprocessing"] == "imagenet_bilinear"
