#!/usr/bin/env bash
# Several nodes: run this on every node; the torchrun processes meet at a c10d rendezvous endpoint.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/multinode.sh [--dry-run] [trainer arguments...]

Run on each of NNODES nodes; torchrun starts one worker per GPU and the nodes meet at the rendezvous endpoint.
  --dry-run   print the command instead of running it
Trainer arguments go to `python -m unet3d_dist.train` (see its --help), e.g. on each of two nodes:
  NNODES=2 MASTER_ADDR=node1 launch/multinode.sh --config configs/default.yaml

Environment:
  NNODES          number of nodes (required)
  RDZV_ENDPOINT   host:port of the rendezvous, on one of the nodes (default: MASTER_ADDR:MASTER_PORT)
  MASTER_ADDR     host of the rendezvous when RDZV_ENDPOINT is not set
  MASTER_PORT     its port (default: 29500)
  RDZV_ID         id shared by the nodes of one run (default: unet3d)
  NPROC           worker processes per node (default: the number of visible GPUs, or 1 without GPUs)
  PYTHON          interpreter with unet3d_dist installed (default: the active environment's, else the
                  repository's .venv, else python3)
No node rank is needed: the c10d rendezvous numbers the nodes itself (torchrun ignores --node_rank with it).
Exit code: the trainer's; 75 when a signal stopped the run after a checkpoint (run it again to resume).
USAGE
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_options "$@"
if [ -z "${NNODES:-}" ] || [ -z "${RDZV_ENDPOINT:-${MASTER_ADDR:-}}" ]; then
  echo "launch/multinode.sh: set NNODES, and RDZV_ENDPOINT=host:port or MASTER_ADDR" >&2
  usage >&2
  exit 2
fi
run_trainer "${TORCHRUN[@]}" --nnodes="$NNODES" --nproc_per_node="${NPROC:-$(default_nproc)}" \
  --rdzv_backend=c10d --rdzv_endpoint="${RDZV_ENDPOINT:-$MASTER_ADDR:${MASTER_PORT:-29500}}" \
  --rdzv_id="${RDZV_ID:-unet3d}" -m unet3d_dist.train "${trainer_args[@]}"
