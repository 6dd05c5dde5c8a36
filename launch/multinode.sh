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
  NNODES          number of nodes (required), or a range MIN:MAX for an elastic job: when a node dies, torchrun
                  restarts the group on the nodes left (at least MIN) and the run resumes from its last checkpoint
                  with the same global batch (NNODES=1:4 with NPROC=4 needs train.global_batch to divide over 4, 8,
                  12 and 16 ranks, which is checked at start)
  MAX_RESTARTS    group restarts torchrun allows (default: 3 with a node range, else 0)
  RDZV_CONF       extra rendezvous settings, e.g. last_call_timeout=10 (how long a restart waits for more nodes)
  RDZV_ENDPOINT   host:port of the rendezvous, on one of the nodes (default: MASTER_ADDR:MASTER_PORT)
  MASTER_ADDR     host of the rendezvous when RDZV_ENDPOINT is not set
  MASTER_PORT     its port (default: 29500)
  RDZV_ID         id shared by the nodes of one run (default: unet3d)
  NPROC           worker processes per node (default: the number of visible GPUs, or 1 without GPUs)
  GLOO_SOCKET_IFNAME  network interface for gloo (default: the one that routes to the rendezvous host)
  NCCL_SOCKET_IFNAME  NCCL's, where its own choice is wrong (e.g. ib0 or eth0)
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
endpoint=${RDZV_ENDPOINT:-$MASTER_ADDR:${MASTER_PORT:-29500}}
nproc=${NPROC:-$(default_nproc)}
restarts=${MAX_RESTARTS:-0}
if [[ $NNODES == *:* ]]; then
  # Every world size the job may restart on, so that the trainer refuses a global batch that would not divide
  # over one of them now, not after the restart.
  restarts=${MAX_RESTARTS:-3}
  TORCHRUN=(env UNET3D_ELASTIC_WORLD_SIZES="$(seq -s ' ' $((${NNODES%:*} * nproc)) "$nproc" $((${NNODES#*:} * nproc)))"
    "${TORCHRUN[@]:1}")
fi
# gloo (CPU jobs, and the small host-side agreements of GPU jobs) binds to the interface this host's name resolves
# to, which on many clusters is not the network that reaches the other nodes; by default it takes the interface that
# routes to the rendezvous host. NCCL picks its own (InfiniBand first); set NCCL_SOCKET_IFNAME where it picks wrong.
if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && command -v ip >/dev/null; then
  head_ip=$(getent ahostsv4 "${endpoint%:*}" | awk 'NR == 1 {print $1}') || true
  GLOO_SOCKET_IFNAME=$(ip route get "$head_ip" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p') || true
  if [ -n "$GLOO_SOCKET_IFNAME" ]; then
    export GLOO_SOCKET_IFNAME
    echo "launch: GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME (the interface that reaches $head_ip)" >&2
  fi
fi
run_trainer "${TORCHRUN[@]}" --nnodes="$NNODES" --nproc_per_node="$nproc" --max-restarts="$restarts" \
  --rdzv_backend=c10d --rdzv_endpoint="$endpoint" --rdzv_id="${RDZV_ID:-unet3d}" ${RDZV_CONF:+--rdzv_conf="$RDZV_CONF"} \
  -m unet3d_dist.train "${trainer_args[@]}"
