"""kill -9 mid-epoch + resume == an uninterrupted run; re-runs; CLI errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sslbench_jax.backbones import random_init
from sslbench_jax.finetune import command
from sslbench_jax.finetune import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = dict(dataset="digits", protocol="full", epochs=2, batch_size=32, image_size=32,
            train_limit=128, test_limit=40, checkpoint_every_steps=3, eval_batch_size=16,
            threads=2, progress=False, head_bn=True)


def _weights(tmp_path):
  path = str(tmp_path / "rn.npz")
  random_init.write("resnet18", 0, path, {"stage_sizes": (1, 1)})
  return path


def _cli(weights, workdir, env=None, **extra):
  args = {**ARGS, **extra, "weights": weights, "workdir": workdir}
  argv = [sys.executable, "-m", "sslbench_jax.cli", "finetune"]
  for k, v in args.items():
    if isinstance(v, bool):
      argv.append(f"--{k}" if v else f"--no{k}")
    else:
      argv.append(f"--{k}={v}")
  return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _result(workdir):
  with open(os.path.join(workdir, "result.json")) as f:
    r = json.load(f)
  r.pop("timing")
  return r


def _state_leaves(workdir):
  return jax.tree_util.tree_leaves_with_path(train.restore_state(workdir)["state"])


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
  w = _weights(tmp_path)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  # 128 / 32 = 4 steps per epoch, 8 in all; checkpoints at 3, 4, 6, 8: killed
  # after step 7, the run resumes at step 6, in the middle of epoch 2.
  killed = _cli(w, a, env={train.KILL_ENV: "7"})
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert not os.path.exists(os.path.join(a, "result.json"))
  with open(os.path.join(a, "metrics.jsonl")) as f:
    assert len(f.readlines()) == 1
  assert train.restore_state(a)["step"] == 6
  resumed = command.run({**ARGS, "weights": w, "workdir": a})
  assert resumed["timing"]["resumed_from_step"] == 6
  whole = command.run({**ARGS, "weights": w, "workdir": b})
  assert whole["timing"]["resumed_from_step"] == 0
  assert _result(a) == _result(b)
  assert _result(a)["steps"] == 8 and _result(a)["epochs"] == 2
  with open(os.path.join(a, "metrics.jsonl")) as f, open(os.path.join(b, "metrics.jsonl")) as g:
    rows_a, rows_b = f.read(), g.read()
  assert rows_a == rows_b and len(rows_a.splitlines()) == 2
  la, lb = _state_leaves(a), _state_leaves(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))

  # Re-running a finished run does nothing; another config is refused.
  mtime = os.path.getmtime(os.path.join(b, "result.json"))
  again = command.run({**ARGS, "weights": w, "workdir": b})
  assert os.path.getmtime(os.path.join(b, "result.json")) == mtime
  assert again["top1"] == whole["top1"]
  with pytest.raises(ValueError, match="another configuration.*epochs|recipe"):
    command.run({**ARGS, "epochs": 3, "weights": w, "workdir": b})


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
  w = _weights(tmp_path)
  out = str(tmp_path / "x")
  r = _cli(w, out, dataset="no_such_dataset")
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("finetune: error:") and "no_such_dataset" in lines[-1]
  assert not os.path.exists(out)
  r = _cli(w, out, protocol="fewshot", label_fraction=0.5)
  assert r.returncode == 2 and "label_fraction" in r.stderr.splitlines()[-1]
  assert not os.path.exists(out)
