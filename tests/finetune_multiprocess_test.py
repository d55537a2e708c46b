"""2 processes (jax.distributed over gloo) == 1 process on 2 devices == 1 device."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

import multiprocess_util
from sslbench_jax.backbones import random_init
from sslbench_jax.finetune import train

ROOT = multiprocess_util.ROOT
ARGS = ["--dataset=digits", "--protocol=full", "--epochs=1", "--batch_size=16",
        "--image_size=32", "--train_limit=48", "--test_limit=20", "--eval_batch_size=8",
        "--threads=1", "--noprogress", "--head_bn", "--checkpoint_every_steps=100"]


def _cmd(weights, workdir, *extra):
  return [sys.executable, "-m", "sslbench_jax.cli", "finetune", f"--weights={weights}",
          f"--workdir={workdir}", *ARGS, *extra]


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _result(workdir):
  with open(os.path.join(workdir, "result.json")) as f:
    r = json.load(f)
  for k in ("timing", "device_count", "process_count", "versions"):
    r.pop(k)
  return r


def test_two_processes_equal_one(tmp_path):
  w = str(tmp_path / "rn.npz")
  random_init.write("resnet18", 0, w, {"stage_sizes": (1, 1)})
  one, two_dev, two_proc = (str(tmp_path / n) for n in ("one", "two_dev", "two_proc"))
  for d, devices in ((one, 1), (two_dev, 2)):
    r = subprocess.run(_cmd(w, d), env=_env(devices), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
  address = f"127.0.0.1:{multiprocess_util.free_port()}"
  procs = [subprocess.Popen(_cmd(w, two_proc, f"--coordinator_address={address}",
                                 "--num_processes=2", f"--process_id={i}"),
                            env=_env(1), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  with open(os.path.join(two_proc, "result.json")) as f:
    meta = json.load(f)
  assert (meta["process_count"], meta["device_count"]) == (2, 2)
  ref = _result(one)
  for d in (two_dev, two_proc):
    got = _result(d)
    np.testing.assert_allclose([got.pop("top1"), got.pop("top5")],
                               [ref["top1"], ref["top5"]], atol=1e-9)
    assert got == {k: v for k, v in ref.items() if k not in ("top1", "top5")}
    a = jax.tree_util.tree_leaves_with_path(train.restore_state(one)["state"])
    b = jax.tree_util.tree_leaves_with_path(train.restore_state(d)["state"])
    assert [p for p, _ in a] == [p for p, _ in b]
    for (p, x), (_, y) in zip(a, b):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6,
                                 err_msg=f"{d} {p}")
