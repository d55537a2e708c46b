#!/usr/bin/env bash
# The main job on its embedded default config (configs/demo.py): sets up .venv
# (if needed; SSLBENCH_ACCELERATOR=cpu|cuda12|tpu picks the jax build, default
# cpu) and runs a whole evaluation into runs/demo (WORKDIR overrides it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/sslbench-jax evaluate --config configs/demo.py --workdir "${WORKDIR:-runs/demo}" "$@"
