#!/usr/bin/env bash
# The main job on its embedded default config (configs/demo.py): sets up .venv
# (if needed) and runs a whole evaluation into runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/sslbench-jax evaluate --config configs/demo.py --workdir "${WORKDIR:-runs/demo}" "$@"
