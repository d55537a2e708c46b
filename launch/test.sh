#!/usr/bin/env bash
# The test command: sets up .venv (if needed) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q --durations=25 "$@"
