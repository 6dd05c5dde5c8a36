#!/usr/bin/env bash
# The device check, under 5 minutes on one GPU, on a bare machine: it installs nothing and needs only torch, numpy,
# scipy, h5py, rich and pyyaml (no SimpleITK, medpy or wandb). Each row is appended to DIR/gpu.jsonl and DIR/gpu.md
# as soon as it is measured, so a timeout keeps the rows before it; --only GROUP... reruns some rows. Without a GPU
# it rehearses on the CPU (--tiny: small sizes). Copy gpu.md into docs/PERFORMANCE.md with the date.
#   usage: launch/gpu_check.sh [--out DIR] [--only GROUP ...] [--tiny]      (python3 -m unet3d_dist.bench gpu --help)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/lib.sh
source launch/lib.sh  # PYTHON: the active environment's, else .venv's, else python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself: no pip install needed
exec "$PYTHON" -m unet3d_dist.bench gpu "$@"
