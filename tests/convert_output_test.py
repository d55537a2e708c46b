"""Converted weights are committed as one unit; faults leave nothing mistakable.

A process is SIGKILLed at each stage of ``weights.save_variables`` (through
its ``SSLBENCH_FAULT_AT`` test hook, so the kill point is deterministic), and
the folder is then judged as a later run would: either the previous finished
weights still load, or the output reads as unfinished; never new weights
under an old sidecar. Read-only folders and a full disk give one-line errors
(exit 1) and leave nothing.
"""

import contextlib
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


@contextlib.contextmanager
def _tmpfs(directory, options):
  """``directory`` as a fresh tmpfs mounted with ``options`` (root only)."""
  directory.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                     capture_output=True, text=True, check=False)
  if r.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
  try:
    yield directory
  finally:
    subprocess.run(["umount", str(directory)], check=False)


@contextlib.contextmanager
def _read_only_folder(directory):
  """A folder nobody can write to: a read-only tmpfs as root, else mode 0555."""
  if os.geteuid() == 0:  # root ignores permission bits
    with _tmpfs(directory, "ro,size=64k") as d:
      yield d, "Read-only file system"
  else:
    directory.mkdir()
    directory.chmod(0o555)
    try:
      yield directory, "Permission denied"
    finally:
      directory.chmod(0o755)


def test_cli_read_only_folder_exits_1(tmp_path, rn18_path):
  with _read_only_folder(tmp_path / "ro") as (out_dir, reason):
    result = _cli(f"--checkpoint={rn18_path}", "--arch=resnet18", f"--out={out_dir}/w.npz")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {out_dir}/w.npz: {reason}")
    assert _listing(out_dir) == []


def test_cli_full_disk_exits_1_and_leaves_nothing(tmp_path, rn18_path):
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root; see the in-process tests below")
  # 1 MiB of space for ~45 MB of ResNet-18 weights: a real ENOSPC mid-write.
  with _tmpfs(tmp_path / "full", "size=1m") as out_dir:
    result = _cli(f"--checkpoint={rn18_path}", "--arch=resnet18", f"--out={out_dir}/w.npz")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {out_dir}/w.npz: No space left on device")
    assert _listing(out_dir) == []


def test_disk_full_while_writing_the_weights_leaves_nothing(tmp_path, rn18_path,
                                                           monkeypatch):
  def fsync(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", fsync)
  with pytest.raises(OutputError, match="cannot write .*w.npz: No space left on device"):
    convert_checkpoint(rn18_path, "resnet18", str(tmp_path / "w.npz"))
  assert _listing(tmp_path) == []


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
