"""``sslbench-jax convert`` end to end, as a user runs it (subprocess)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sslbench_jax.backbones import registry
from sslbench_jax.backbones import weights
import torch_resnet

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run(
      [sys.executable, "-m", "sslbench_jax.cli", "convert", *args],
      cwd=_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def dino_checkpoint(tmp_path_factory):
  teacher = torch_resnet.randomize(torch_resnet.resnet("resnet18"), seed=0)
  student = torch_resnet.randomize(torch_resnet.resnet("resnet18"), seed=1)
  path = str(tmp_path_factory.mktemp("ckpt") / "dino.pth")
  torch.save({"teacher": {"backbone." + k: v for k, v in teacher.state_dict().items()},
              "student": {"module.backbone." + k: v
                          for k, v in student.state_dict().items()}}, path)
  return path, student


def test_converts_selected_backbone_and_prints_one_line(tmp_path, dino_checkpoint):
  path, student = dino_checkpoint
  out = str(tmp_path / "dino_student.npz")
  result = _run(f"--checkpoint={path}", "--arch=resnet18", f"--out={out}",
                "--select=student")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  assert "resnet18 from dino checkpoint" in lines[0]
  assert "prefix 'student.module.backbone.'" in lines[0]
  assert lines[0].endswith("(dropped teacher.*)")
  variables, meta = weights.load_variables(out)
  with open(out + ".json") as f:
    assert json.load(f)["prefix"] == "student.module.backbone."
  x = np.random.RandomState(0).randn(1, 32, 32, 3).astype(np.float32)
  got = registry.create_model("resnet18", **meta["arch_options"]).apply(variables, x)
  with torch.no_grad():
    ref = student.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(got["pre_logits"], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("content,arch,message", [
    (b"\xff\xd8\xff\xe0JFIF" + bytes(64), "resnet18", "looks like a JPEG image"),
    (None, "resnet50", "not resnet50: use arch=resnet18"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, dino_checkpoint, content, arch,
                                         message):
  path = dino_checkpoint[0]
  if content is not None:
    path = str(tmp_path / "x.pth")
    with open(path, "wb") as f:
      f.write(content)
  out_dir = tmp_path / "out"
  result = _run(f"--checkpoint={path}", f"--arch={arch}", f"--out={out_dir}/w.npz")
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], result.stderr
  assert "Traceback" not in result.stderr
  assert not out_dir.exists()
