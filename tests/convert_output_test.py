"""Converted weights are committed as one unit; faults leave nothing mistakable.

A process is SIGKILLed at each stage of ``weights.save_variables`` (through
its ``SSLBENCH_FAULT_AT`` test hook, so the kill point is deterministic), and
the folder is then judged as a later run would: either the previous finished
weights still load, or the output reads as unfinished; never new weights
under an old sidecar. Read-only folders and a full disk give one-line errors
(exit 1) and leave nothing.
"""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sslbench_jax.backbones import weights
from sslbench_jax.convert import OutputError
from sslbench_jax.convert import convert_checkpoint
import torch_resnet

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STAGES = ("weights_tmp", "weights_replaced", "sidecar_tmp")

_SAVE = """
import sys
import numpy as np
from sslbench_jax.backbones import weights
seed = int(sys.argv[2])
w = np.random.RandomState(seed).randn(1 << 21).astype(np.float32)  # 8 MB
weights.save_variables(sys.argv[1], {"params": {"w": w}},
                       {"arch": "resnet18", "arch_options": {}, "seed": seed})
"""


def _save_in_subprocess(out, seed, stage=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("SSLBENCH_FAULT_AT", None)
  if stage:
    env["SSLBENCH_FAULT_AT"] = stage
  return subprocess.run([sys.executable, "-c", _SAVE, out, str(seed)], cwd=_ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _expected(seed):
  return np.random.RandomState(seed).randn(1 << 21).astype(np.float32)


def _listing(directory):
  return sorted(os.listdir(directory))


@pytest.mark.parametrize("stage", _STAGES)
def test_kill_9_at_every_stage_leaves_old_weights_or_unfinished(tmp_path, stage):
  out = str(tmp_path / "w.npz")
  assert _save_in_subprocess(out, seed=1).returncode == 0
  assert _listing(tmp_path) == ["w.npz", "w.npz.json"]

  killed = _save_in_subprocess(out, seed=2, stage=stage)
  assert killed.returncode == -9, killed.stderr
  left = _listing(tmp_path)
  temps = [n for n in left if n.startswith(".tmp-")]
  # What the kill leaves (docs/reliability.md): a temp file while writing,
  # an .npz without its sidecar after the rename.
  assert ("w.npz.json" in left) is False
  assert len(temps) == (0 if stage == "weights_replaced" else 1), left
  assert not weights.is_complete(out)
  with pytest.raises(FileNotFoundError, match="unfinished conversion"):
    weights.load_variables(out)
  # The failed load already removed the dead writer's temp file.
  assert [n for n in _listing(tmp_path) if n.startswith(".tmp-")] == []

  assert _save_in_subprocess(out, seed=2).returncode == 0
  assert _listing(tmp_path) == ["w.npz", "w.npz.json"]
  variables, meta = weights.load_variables(out)
  assert meta["seed"] == 2
  np.testing.assert_array_equal(variables["params"]["w"], _expected(2))


def test_stale_temps_are_removed_by_the_next_save_only_if_their_writer_died(tmp_path):
  out = str(tmp_path / "w.npz")
  assert _save_in_subprocess(out, seed=1, stage="weights_tmp").returncode == -9
  (dead,) = [n for n in _listing(tmp_path) if n.startswith(".tmp-")]
  assert os.path.getsize(tmp_path / dead) > 8_000_000  # the whole .npz, uncommitted
  # A live writer's temp file (this process) and unrelated files are kept.
  live = tmp_path / f".tmp-w.npz~{weights._host()}~{os.getpid()}~abc"  # pylint: disable=protected-access
  live.write_bytes(b"x")
  other = tmp_path / ".tmp-features.npz~x~1~abc"
  other.write_bytes(b"y")
  assert _save_in_subprocess(out, seed=3).returncode == 0
  assert _listing(tmp_path) == sorted([live.name, other.name, "w.npz", "w.npz.json"])


def test_mismatched_pair_is_refused(tmp_path):
  # An .npz replaced behind its sidecar's back (e.g. copied from another run).
  a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
  assert _save_in_subprocess(a, seed=1).returncode == 0
  assert _save_in_subprocess(b, seed=2).returncode == 0
  os.replace(b, a)
  assert not weights.is_complete(a)
  with pytest.raises(ValueError, match="weights_sha256 differs"):
    weights.load_variables(a)


def _cli(*args, env=None):
  full = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  if not env:
    full.pop("SSLBENCH_FAULT_AT", None)
  return subprocess.run([sys.executable, "-m", "sslbench_jax.cli", "convert", *args],
                        cwd=_ROOT, capture_output=True, text=True, timeout=600, env=full)


@pytest.fixture(scope="module")
def rn18_path(tmp_path_factory):
  model = torch_resnet.randomize(torch_resnet.resnet("resnet18"), seed=0)
  path = str(tmp_path_factory.mktemp("ckpt") / "rn18.pth")
  torch.save(model.state_dict(), path)
  return path


def test_cli_killed_twice_then_rerun(tmp_path, rn18_path):
  out_dir = tmp_path / "weights"
  out = str(out_dir / "rn18.npz")
  args = (f"--checkpoint={rn18_path}", "--arch=resnet18", f"--out={out}")
  first = _cli(*args, env={"SSLBENCH_FAULT_AT": "weights_tmp"})
  assert first.returncode == -9
  (temp,) = _listing(out_dir)
  assert temp.startswith(".tmp-rn18.npz~")
  second = _cli(*args, env={"SSLBENCH_FAULT_AT": "weights_replaced"})
  assert second.returncode == -9
  assert _listing(out_dir) == ["rn18.npz"]  # first temp cleaned; no sidecar
  with pytest.raises(FileNotFoundError, match="unfinished conversion"):
    weights.load_variables(out)
  third = _cli(*args)
  assert third.returncode == 0, third.stderr
  assert _listing(out_dir) == ["rn18.npz", "rn18.npz.json"]
  variables, meta = weights.load_variables(out)
  assert meta["checkpoint_sha256"] == weights.sha256_file(rn18_path)
  np.testing.assert_array_equal(
      variables["params"]["conv1"]["kernel"],
      torch.load(rn18_path, weights_only=True)["conv1.weight"].numpy().transpose(2, 3, 1, 0))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; "
                    "the read-only case is simulated in the tests below")
def test_cli_read_only_folder_exits_1(tmp_path, rn18_path):
  out_dir = tmp_path / "ro"
  out_dir.mkdir()
  out_dir.chmod(0o555)
  try:
    result = _cli(f"--checkpoint={rn18_path}", "--arch=resnet18",
                  f"--out={out_dir}/w.npz")
  finally:
    out_dir.chmod(0o755)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: cannot write {out_dir}/w.npz: Permission denied")
  assert _listing(out_dir) == []


_PATCHED_CLI = """
import errno, os, sys, tempfile
from sslbench_jax import cli
code = getattr(errno, sys.argv[1])
real_mkstemp, real_fsync = tempfile.mkstemp, os.fsync
def fail(*args, **kwargs):
  raise OSError(code, os.strerror(code))
if sys.argv[2] == "mkstemp":   # the folder refuses new files (read-only)
  tempfile.mkstemp = fail
else:                          # data cannot reach the disk (full)
  os.fsync = fail
cli.run(["sslbench-jax", "convert"] + sys.argv[3:])
"""


@pytest.mark.parametrize("code,where,message", [
    ("EROFS", "mkstemp", "Read-only file system"),
    ("ENOSPC", "fsync", "No space left on device"),
])
def test_cli_unwritable_output_exits_1_with_one_line(tmp_path, rn18_path, code, where,
                                                     message):
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("SSLBENCH_FAULT_AT", None)
  result = subprocess.run(
      [sys.executable, "-c", _PATCHED_CLI, code, where, f"--checkpoint={rn18_path}",
       "--arch=resnet18", f"--out={out_dir}/w.npz"],
      cwd=_ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: cannot write {out_dir}/w.npz: {message}")
  assert _listing(out_dir) == []


def test_disk_full_while_writing_the_sidecar_leaves_nothing(tmp_path, rn18_path,
                                                           monkeypatch):
  out = str(tmp_path / "w.npz")
  real = os.fsync
  calls = []

  def fsync(fd):
    calls.append(fd)
    if len(calls) == 2:  # the .npz went through; the sidecar's data does not
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd)

  monkeypatch.setattr(os, "fsync", fsync)
  with pytest.raises(OutputError, match="cannot write .*w.npz: No space left on device"):
    convert_checkpoint(rn18_path, "resnet18", out)
  assert len(calls) == 2
  assert _listing(tmp_path) == []
