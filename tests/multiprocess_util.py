"""Run test code on N forced CPU devices or in 2 local processes (gloo)."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_on_devices(code: str, devices: int, timeout: int = 240) -> None:
  """Runs ``code`` (which prints "OK" at the end) with ``devices`` CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def run_two_processes(code: str, timeout: int = 240) -> None:
  """Runs ``code`` in 2 processes; it gets ``sys.argv[1:] == [address, process_id]``."""
  address = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", code, address, str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
           for i in range(2)]
  outputs = [p.communicate(timeout=timeout) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0 and "OK" in out, err[-3000:]
