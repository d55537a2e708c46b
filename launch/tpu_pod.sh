#!/usr/bin/env bash
# The same command on every host of a Cloud TPU pod slice. JAX detects the pod
# (TPU_WORKER_HOSTNAMES) and calls jax.distributed.initialize() itself; every
# host extracts its shard of each dataset, process 0 writes the results.
#   TPU=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/runs/x \
#     bash launch/tpu_pod.sh configs/demo.py
# WORKDIR must be a file system every host mounts (NFS/Filestore). Each host
# sets up its own .venv with jax's TPU build (launch/setup.sh --accelerator tpu).
set -euo pipefail
CONFIG=${1:?config file}
: "${TPU:?set TPU}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (shared by all hosts)}"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/sslbench_jax && bash launch/setup.sh --accelerator tpu && \
   .venv/bin/sslbench-jax evaluate --config $CONFIG --workdir $WORKDIR"
