#!/usr/bin/env bash
# One process on the CPU or on one GPU, without torchrun: the same code path with a world size of 1, where
# breakpoints and profilers work as usual.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/debug.sh [--dry-run] [trainer arguments...]

Train in a single process (CPU, or the first GPU if there is one).
  --dry-run   print the command instead of running it
Trainer arguments go to `python -m unet3d_dist.train` (see its --help), e.g.
  launch/debug.sh --config configs/debug.yaml train.epochs=1

Environment: PYTHON   interpreter with unet3d_dist installed (default: the active environment's, else
                      the repository's .venv, else python3)
Exit code: the trainer's; 75 when a signal stopped the run after a checkpoint (run it again to resume).
USAGE
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_options "$@"
run_trainer "$PYTHON" -m unet3d_dist.train "${trainer_args[@]}"
