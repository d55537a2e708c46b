#!/usr/bin/env bash
# Two processes on this machine, each with 2 CPU devices, exactly as two hosts
# would run (jax.distributed over 127.0.0.1, gloo collectives). A rehearsal of a
# pod run on a laptop:  bash launch/multiprocess_local.sh configs/demo.py:tiny=True runs/mp
# Exits non-zero when either process fails.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?config}; WORKDIR=${2:?workdir}; PORT=${PORT:-12355}
export XLA_FLAGS=--xla_force_host_platform_device_count=2
pids=()
for i in 0 1; do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \
    .venv/bin/sslbench-jax evaluate --config "$CONFIG" --workdir "$WORKDIR" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
