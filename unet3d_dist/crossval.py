"""Cross-validation: ``python -m unet3d_dist.crossval --config RECIPE [--folds 5] [section.key=value ...]``.

Trains each fold of a recipe and scores it on the fold's held-out cases (a rerun resumes), pools every fold's
results into one table, and prints the commands that use the folds as one ensemble. How, and where the results
go: ``crossvalidation.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .crossvalidation import crossval
from .exit_codes import run_command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="unet3d-crossval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="training recipe, e.g. configs/la_mri.yaml")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    parser.add_argument(
        "--only", type=int, nargs="+", metavar="K", help="run these folds only (the summary pools what exists)"
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=max(1, torch.cuda.device_count()),
        help="processes per fold (default: the visible GPUs, or 1)",
    )
    parser.add_argument(
        "--eval-data",
        help="evaluate on this prepared dataset instead (same case ids, e.g. the native-resolution scans)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command(lambda: crossval(args))


if __name__ == "__main__":
    main()
