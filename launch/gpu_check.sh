#!/usr/bin/env bash
# GPU check, under 5 minutes on one GPU: bf16/fp16 x channels_last training throughput (--compile adds compiled rows),
# peak memory, the loader's rate, one whole-volume evaluation, a 1-process torchrun with NCCL and CUDA-only checks. Writes
# bench-results/gpu.json; copy the table into docs/PERFORMANCE.md with the date, GPU model and torch version.
#   usage: launch/gpu_check.sh [--repeat N] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/lib.sh
source launch/lib.sh  # PYTHON: the active environment's, else .venv's, else python3
exec "$PYTHON" -m unet3d_dist.bench gpu "$@"
