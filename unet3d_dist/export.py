"""Export for runtimes without PyTorch: ``python -m unet3d_dist.export --checkpoint CKPT [--checkpoint ...] --out DIR``.

Writes each checkpoint (one, or every member of an ensemble) as ``DIR/member-<i>.onnx``, checked against PyTorch
and recording what ``python -m unet3d_dist.onnx_predict`` needs to segment a scan as ``unet3d_dist.predict`` would;
``--pt2`` adds a ``torch.export`` program beside each. The flags --amp, --device and --stitch-device do not apply:
the exported network computes in float32. What the files hold and how they are checked: ``exporting.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .exit_codes import run_command
from .exporting import export
from .segmenter import add_inference_flags


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="unet3d-export",
        description="Write each checkpoint as an ONNX file that onnx_predict runs without PyTorch; the inference "
        "flags are recorded in it (--amp, --device and --stitch-device do not apply).",
        epilog="example: python -m unet3d_dist.export --checkpoint runs/ct_liver/checkpoints/best.pt --tta --out "
        "exported/ct_liver",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        required=True,
        help="a checkpoint written by unet3d_dist.train; repeat --checkpoint for each member of an ensemble",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for member-<i>.onnx")
    parser.add_argument("--pt2", action="store_true", help="also write member-<i>.pt2 (torch.export) beside each")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    add_inference_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command(lambda: export(args))


if __name__ == "__main__":
    main()
