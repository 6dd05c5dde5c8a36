"""Prediction without PyTorch: ``python -m unet3d_dist.onnx_predict --model DIR INPUT... --out DIR``.

Writes ``--out/<name>_mask.<ext>`` for each input, on the input's own grid, with the ``member-<i>.onnx`` files that
``python -m unet3d_dist.export`` wrote into ``--model``: the mask ``predict`` writes with the same settings, computed
with onnxruntime and without PyTorch. A bad input is skipped with one sentence (exit status 3), as in predict. How,
and what it needs: ``onnx_prediction.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .exit_codes import run_command
from .onnx_prediction import predict_all
from .scans import MASK_FORMATS, add_scan_arguments, parse_scan_arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="unet3d-onnx-predict",
        description="Segment scans with the ONNX files of unet3d_dist.export, without PyTorch; masks come out on "
        "each input's own grid.",
        epilog="example: python -m unet3d_dist.onnx_predict --model exported/ct_liver scans/*.nii.gz --out masks",
    )
    parser.add_argument("--model", type=Path, required=True, help="the folder unet3d_dist.export wrote")
    add_scan_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="folder for <name>_mask.<format>")
    parser.add_argument(
        "--format", choices=tuple(MASK_FORMATS), default="nii.gz", help="mask file format (default: nii.gz)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="predict every scan again (default: a scan whose mask exists is skipped)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads per network (default 0: onnxruntime's choice, one per core)"
    )
    return parse_scan_arguments(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command(lambda: predict_all(args))


if __name__ == "__main__":
    main()
