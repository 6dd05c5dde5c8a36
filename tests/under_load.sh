#!/usr/bin/env bash
# The distributed tests ROUNDS times in a row while a real training job loads the machine, as on a shared node.
#   usage: tests/under_load.sh [ROUNDS] [pytest arguments...]
#   default: 20 rounds of tests/test_distributed.py tests/test_launch.py
# A real job loads the memory system as well as the cores; busy loops alone did not show the faults this finds.
# The load is `python -m unet3d_dist.train` (the default run, made endless) in a temporary runs folder, started here
# in a process group of its own; the rounds start once it trains (its first run on a machine generates the phantom,
# as the quickstart does). When this script exits, however it exits, the load gets SIGINT (it stops as on Ctrl-C,
# cleaning up after itself) and 20 s later SIGKILL, its every process.
# Exit status: 0 when every round passed, 1 when some failed, 2 when the load could not be started.
# Environment: PYTHON (default: .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-20}
shift $(($# > 0 ? 1 : 0))
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || command -v "$python" >/dev/null || {
  echo "tests/under_load.sh: no python at $python (make .venv as the README's quickstart does, or set PYTHON)" >&2
  exit 2
}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "tests/under_load.sh: ROUNDS must be a positive number, not '$rounds'" >&2; exit 2; }
[ $# -gt 0 ] || set -- tests/test_distributed.py tests/test_launch.py

runs=$(mktemp -d)
load_pid=

descendants() {  # every process below $1, deepest first
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    descendants "$child"
    echo "$child"
  done
}

stop_load() {
  [ -n "$load_pid" ] || return 0
  local pids waited=0
  pids=$(descendants "$load_pid")
  kill -INT -- "-$load_pid" 2>/dev/null  # the load's process group: the trainer and its loader workers
  while kill -0 -- "-$load_pid" 2>/dev/null && [ "$waited" -lt 40 ]; do
    sleep 0.5
    waited=$((waited + 1))
  done
  kill -KILL -- "-$load_pid" 2>/dev/null
  # shellcheck disable=SC2086  # one pid per word
  kill -KILL "$load_pid" $pids 2>/dev/null  # and anything of it that left the group
  wait "$load_pid" 2>/dev/null
  load_pid=
}

start_load() {
  # setsid: the load gets a process group of its own (its pid), so that it can be killed whole and a Ctrl-C at the
  # terminal reaches the tests, not the load.
  setsid "$python" -m unet3d_dist.train log.runs_dir="$runs" log.run_name=load train.epochs=100000 \
    log.wandb=disabled >>"$runs/load.log" 2>&1 &
  load_pid=$!
}

load_alive() { [ -n "$load_pid" ] && kill -0 "$load_pid" 2>/dev/null; }

cleanup() {
  stop_load
  rm -rf "$runs"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_load
echo "under_load: waiting for the load to start training (its first run on this machine generates the phantom)" >&2
until [ -s "$runs/load/metrics.jsonl" ]; do  # written at its first logged step
  if ! load_alive; then
    echo "tests/under_load.sh: the training job meant as load ended before it trained; its output:" >&2
    tail -n 20 "$runs/load.log" >&2
    exit 2
  fi
  sleep 1
done

failed=0
for round in $(seq "$rounds"); do
  if ! load_alive; then  # it never ends by itself (100,000 epochs): something killed it
    echo "under_load: the load had ended before round $round (last lines below); starting it again" >&2
    tail -n 5 "$runs/load.log" >&2
    load_pid=
    start_load
  fi
  start=$SECONDS
  "$python" -m pytest -q -x -p no:cacheprovider "$@"
  rc=$?
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  echo "under_load: round $round/$rounds exit $rc in $((SECONDS - start)) s beside a training job" >&2
done
echo "under_load: $failed of $rounds rounds failed" >&2
[ "$failed" -eq 0 ]
