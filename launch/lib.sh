# Shared by the launch scripts (sourced, not run): launcher options, the torchrun command, and the exit code 75.
# shellcheck shell=bash

REQUEUE_EXIT_CODE=75                # unet3d_dist.exit_codes.REQUEUE
STOP_MARKER=stopped_by_signal.json  # unet3d_dist.trainer.STOP_MARKER

# The interpreter with unet3d_dist installed: $PYTHON if set, else the active virtual or conda environment's, else
# the repository's .venv (what the README's quickstart makes), else python3. Said on stderr, so logs show which.
choose_python() {
  local repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [ -n "${PYTHON:-}" ]; then :
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PYTHON=$VIRTUAL_ENV/bin/python
  elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then PYTHON=$CONDA_PREFIX/bin/python
  elif [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python
  else PYTHON=python3
  fi
  echo "launch: python is $PYTHON" >&2
}
choose_python

# torchrun forwards only SIGTERM/INT/HUP/QUIT to its workers by default and dies of SIGUSR1, Slurm's usual
# "time is nearly up" signal. torch >= 2.9 also forwards the signals listed in PET_SIGNALS_TO_HANDLE
# (--signals-to-handle); older versions ignore that variable and survive SIGUSR1 because run_trainer ignores it.
# After forwarding, torchrun kills the workers still running after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by
# default, always 30 in older torch). Stopping may take a validation pass, a training step and a checkpoint, so
# the default here is longer, and still shorter than the 120 s notice of the sbatch scripts.
# shellcheck disable=SC2054  # the commas belong to one word
TORCHRUN=(env PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}" "$PYTHON" -m unet3d_dist.torchrun)

# Split "$@" into launcher options (leading --dry-run, --help) and the trainer's arguments.
parse_options() {
  dry_run=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) dry_run=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *) break ;;
    esac
  done
  trainer_args=("$@")
}

# Worker processes per node when NPROC is not set: one per visible GPU, or 1 without GPUs.
default_nproc() {
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)'
}

# Run the command "$@" (or only print it with --dry-run) and exit with its code, except 75 when the trainer
# stopped on a signal after a checkpoint: torchrun exits non-zero whenever its workers were signalled, so the
# trainer's marker file in the run directory, not torchrun's exit code, says "run me again to resume".
# The run directory is the one the trainer arguments from parse_options select.
run_trainer() {
  if [ "$dry_run" = 1 ]; then
    local arg words=()
    for arg in "$@"; do  # quote only the words that need it, so the line reads like a typed command
      if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then words+=("$arg"); else words+=("${arg@Q}"); fi
    done
    echo "${words[*]}"
    exit 0
  fi
  local run_dir status=0 started
  run_dir=$("$PYTHON" -m unet3d_dist.train --print-run-dir "${trainer_args[@]}")
  # Only a marker written after this launcher started counts: one left by an earlier stop must not turn a later
  # failure (before the resume) into a requeue loop. It is compared, not deleted: the run directory belongs to
  # the job that holds it, which may be another one.
  started=$(mktemp)
  # This script has to outlive the stop signals to report 75. Terminals signal the whole foreground process
  # group and Slurm every process of the job step, so torchrun (or the trainer) receives them directly.
  # SIGUSR1 is ignored rather than trapped because an ignored signal stays ignored in the children: torchrun
  # older than 2.9 then survives it, while the trainer installs its own handler.
  trap '' USR1
  trap : INT TERM HUP
  "$@" || status=$?
  if [ "$run_dir/$STOP_MARKER" -nt "$started" ]; then
    status=$REQUEUE_EXIT_CODE
  fi
  rm -f "$started"
  exit "$status"
}
