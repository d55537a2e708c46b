#!/usr/bin/env bash
# Creates ./.venv with the project and its test extras (idempotent), with the
# jax build for one accelerator:
#   bash launch/setup.sh [--accelerator cpu|cuda12|tpu] [--dry-run]
# or SSLBENCH_ACCELERATOR=cpu|cuda12|tpu (the flag wins; default cpu).
# cuda12 / tpu install the matching jax extra at the version pyproject.toml
# pins (jax[cuda12]==X / jax[tpu]==X); the test suite runs on cpu. Going back
# from cuda12/tpu to cpu needs a fresh .venv (rm -rf .venv).
# --dry-run prints the commands instead of running them.
# torch is pinned to 2.13.0, the CPU build (pyproject.toml's test extra; tests
# only, never imported at run time); never unpinned.
set -euo pipefail
cd "$(dirname "$0")/.."

accelerator=${SSLBENCH_ACCELERATOR:-cpu}
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --accelerator) accelerator=${2:?--accelerator needs cpu, cuda12 or tpu}; shift 2 ;;
    --accelerator=*) accelerator=${1#*=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "setup.sh: unknown argument $1 (usage: setup.sh [--accelerator cpu|cuda12|tpu] [--dry-run])" >&2
       exit 2 ;;
  esac
done
case "$accelerator" in
  cpu|cuda12|tpu) ;;
  *) echo "setup.sh: --accelerator $accelerator unknown; use cpu, cuda12 or tpu" >&2; exit 2 ;;
esac

# The one jax pin of the project.
jax_version=$(sed -n 's/^ *"jax==\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
if [ -z "$jax_version" ]; then
  echo "setup.sh: no \"jax==...\" pin in pyproject.toml" >&2
  exit 2
fi

run() {
  if [ "$dry_run" = 1 ]; then
    echo "+ $*"
  else
    "$@"
  fi
}

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  run "$PY" -m venv .venv
fi
stamp=.venv/.sslbench-installed
if [ "$dry_run" = 1 ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  run .venv/bin/python -m pip install -q --upgrade pip
  run .venv/bin/python -m pip install -q -e ".[test]"
  [ "$dry_run" = 1 ] || touch "$stamp"
fi
# The accelerator's jax extra, once per (accelerator, jax version).
accel_stamp=.venv/.sslbench-accelerator
want="$accelerator jax==$jax_version"
if [ "$accelerator" != cpu ]; then
  if [ "$dry_run" = 1 ] || [ "$(cat "$accel_stamp" 2>/dev/null)" != "$want" ]; then
    run .venv/bin/python -m pip install -q "jax[$accelerator]==$jax_version"
    [ "$dry_run" = 1 ] || echo "$want" > "$accel_stamp"
  fi
elif [ "$dry_run" = 1 ]; then
  echo "# accelerator cpu: jax==$jax_version from pyproject.toml, no extra"
fi
