#!/usr/bin/env bash
# The distributed tests ROUNDS times in a row while a real training job loads the machine, as on a shared node.
#   usage: tests/under_load.sh [ROUNDS] [pytest arguments...]
#   default: 20 rounds of tests/test_distributed.py tests/test_launch.py
# A real job loads the memory system as well as the cores; busy loops alone did not show the faults this finds.
# Needs ../shared/tools/under-load (or UNDER_LOAD=path), which counts the failed rounds.
# Environment: PYTHON (default: .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-20}
shift $(($# > 0 ? 1 : 0))
python=${PYTHON:-.venv/bin/python}
under_load=${UNDER_LOAD:-../shared/tools/under-load}
[ -x "$under_load" ] || { echo "tests/under_load.sh: $under_load not found (set UNDER_LOAD)" >&2; exit 2; }
[ $# -gt 0 ] || set -- tests/test_distributed.py tests/test_launch.py

runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
load="$python -m unet3d_dist.train log.runs_dir=$runs log.run_name=load train.epochs=100000 log.wandb=disabled"
"$under_load" -n 1 -r "$rounds" -c "$load" -- "$python" -m pytest -q -x -p no:cacheprovider "$@"
