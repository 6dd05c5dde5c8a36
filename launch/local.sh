#!/usr/bin/env bash
# One node with several GPUs (or several CPU processes): torchrun --standalone, one worker per GPU.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/local.sh [--dry-run] [trainer arguments...]

Train with torchrun on this machine, one worker process per GPU.
  --dry-run   print the command instead of running it
Trainer arguments go to `python -m unet3d_dist.train` (see its --help), e.g.
  NPROC=4 launch/local.sh --config configs/default.yaml

Environment:
  NPROC    worker processes (default: the number of visible GPUs, or 1 without GPUs)
  PYTHON   interpreter with unet3d_dist installed (default: the active environment's, else the
           repository's .venv, else python3)
Exit code: the trainer's; 75 when a signal stopped the run after a checkpoint (run it again to resume).
Stop it with Ctrl-C or by signalling its process group (kill -TERM -- -PGID): torchrun passes the signal on.
USAGE
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_options "$@"
run_trainer "${TORCHRUN[@]}" --standalone --nproc_per_node="${NPROC:-$(default_nproc)}" \
  -m unet3d_dist.train "${trainer_args[@]}"
