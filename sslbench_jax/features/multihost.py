"""Multi-process (multi-host) setup and the few cross-process agreements extraction needs.

Every process runs the same program on its own share of the data (JAX's
multi-controller model). ``initialize`` must run before anything touches a
JAX backend; the helpers below are no-ops in a single process.
"""

from __future__ import annotations

import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np



def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts ``jax.distributed`` when several processes are requested.

  Arguments win over the environment variables ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; without either, a SLURM / MPI /
  Cloud TPU environment with more than one process is auto-detected by JAX. On
  CPU, cross-process collectives use gloo (JAX's default).

  Args:
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: index of this process in ``[0, num_processes)``.

  Returns:
    True when ``jax.distributed`` is (now, or already was) initialised, False
    for a single process.

  Raises:
    ValueError: an incomplete or inconsistent set of settings.
  """
  if jax.distributed.is_initialized():
    return True  # e.g. by the caller of a library entry point
  env = os.environ
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if address is None and n in (None, 1) and pid in (None, 0):
    if _cluster_detected():
      logging.info("multi-process cluster environment detected")
      jax.distributed.initialize()
      return True
    return False
  if address is None or n is None or pid is None:
    raise ValueError("multi-process run needs --coordinator_address, "
                     "--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, "
                     f"JAX_NUM_PROCESSES, JAX_PROCESS_ID); got {address!r}, {n}, {pid}")
  if n < 1 or not 0 <= pid < n:
    raise ValueError(f"--process_id {pid} must be in [0, --num_processes={n})")
  if n == 1:
    return False
  logging.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)",
               address, n, pid)
  jax.distributed.initialize(coordinator_address=address, num_processes=n,
                             process_id=pid)
  return True


def allgather(x: np.ndarray) -> np.ndarray:
  """Stacks ``x`` from every process: returns ``(process_count,) + x.shape``."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def sync(name: str) -> None:
  """Barrier: returns once every process has reached ``sync(name)``."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _cluster_detected() -> bool:
  # Launchers whose multi-process jobs ``jax.distributed.initialize()`` can
  # configure by itself (SLURM, Open MPI, Cloud TPU pod slices).
  if _env_int("SLURM_NTASKS", 1) > 1 or _env_int("OMPI_COMM_WORLD_SIZE", 1) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def _env_int(name: str, default: int | None = None) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return default
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
