"""Prediction on new scans: ``python -m unet3d_dist.predict --checkpoint CKPT [--checkpoint ...] INPUT... [--out DIR]``.

Writes a mask (and a slice panel) for each scan into ``DIR``, on the scan's own grid, with one checkpoint or an
ensemble, on one process or under torchrun; a rerun resumes, and a bad scan is skipped in one sentence (exit status
3). Which inputs it takes, how a scan is prepared and segmented, and how the work is shared and resumed:
``prediction.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .exit_codes import run_command
from .prediction import predict_and_report
from .scans import MASK_FORMATS, add_scan_arguments, parse_scan_arguments
from .segmenter import add_inference_flags


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="unet3d-predict",
        description="Segment scans with a trained checkpoint; masks come out on each input's own grid.",
        epilog=(
            "example: torchrun --nproc_per_node=4 -m unet3d_dist.predict --checkpoint "
            "runs/ct_liver/checkpoints/best.pt scans/ --out predictions"
        ),
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        required=True,
        help="a checkpoint written by unet3d_dist.train; repeat --checkpoint for each member of an ensemble (their "
        "softmax averaged)",
    )
    add_scan_arguments(parser)
    add_output_options(parser)
    add_inference_flags(parser)
    return parse_scan_arguments(parser, argv)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Where the outputs go, in which format, and whether a rerun keeps the ones there."""
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for <name>_mask.<format> and <name>_panel.png (default: <run dir>/predictions; for an ensemble "
        "<runs dir>/ensemble-predictions)",
    )
    parser.add_argument(
        "--format",
        choices=tuple(MASK_FORMATS),
        default="nii.gz",
        help="file format of the masks, <name>_mask.<format> (default: nii.gz)",
    )
    parser.add_argument(
        "--panels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write <name>_panel.png, three slices with the mask, for each scan (default: on; drawing them takes a "
        "good part of a small scan's time)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="predict every scan again, replacing its mask and panel (default: a scan whose mask is in --out is "
        "skipped, so an interrupted run resumes)",
    )


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    args = parse_args(argv)
    run_command(lambda: predict_and_report(args, started))


if __name__ == "__main__":
    main()
