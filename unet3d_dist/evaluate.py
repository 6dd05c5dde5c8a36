"""Evaluation entry point: ``python -m unet3d_dist.evaluate --checkpoint PATH... [--data DATASET] [--split test]``.

Scores one checkpoint, or several as one ensemble, on a split of a prepared dataset (single process, torchrun or
srun) and writes per-case records, their summary, the predicted masks and slice panels into ``--out``; an
interrupted evaluation there is finished by a rerun, anything else is refused unless ``--overwrite``. How it works,
and what the output folder holds: ``evaluation.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .evaluation import REPLACED, evaluate
from .exit_codes import run_command
from .segmenter import add_inference_flags


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="unet3d-evaluate",
        description="Evaluate a checkpoint on whole volumes (single process, torchrun or srun).",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        action="extend",
        required=True,
        help="a checkpoint written by unet3d-train; several (after one --checkpoint, or each after its own) are "
        "evaluated as an ensemble, their softmax averaged",
    )
    parser.add_argument(
        "--data", help="prepared dataset folder, or 'synthetic' (default: the checkpoint's data.dataset)"
    )
    parser.add_argument(
        "--split",
        default="test",
        help="manifest split to evaluate (default: test); 'val' of a cross-validation checkpoint is its held-out fold",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=(
            "output folder (default: <run dir>/eval-<split>); it must be new, empty or an unfinished evaluation, "
            "unless --overwrite"
        ),
    )
    add_inference_flags(parser)
    parser.add_argument(
        "--workers", type=int, default=-1, help="metric processes per rank (default: from the CPU count)"
    )
    parser.add_argument(
        "--mask-format", choices=["nifti", "hdf5"], default="nifti", help="format of the predicted masks"
    )
    parser.add_argument(
        "--panels",
        type=int,
        default=20,
        help="slice pictures for every case, or for the K worst by Dice when there are more (default: 20)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"write into a non-empty --out anyway: its {REPLACED} are removed first and written anew; "
        "other files there (wandb/ among them) are kept",
    )
    parser.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        help="wandb mode (default: the checkpoint's log.wandb; env WANDB_MODE wins)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command(lambda: evaluate(args))


if __name__ == "__main__":
    main()
