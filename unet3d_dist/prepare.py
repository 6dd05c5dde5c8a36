"""Data preparation: ``python -m unet3d_dist.prepare --config RECIPE --input FOLDER... --out DATASET``.

Turns scans (NIfTI, NRRD, MHA, DICOM series, the original project's HDF5 files, the Decathlon/LiTS layout) into a
sharded HDF5 dataset with a manifest, as the recipe says (preparation/recipe.py; examples in configs/prepare_*.yaml).
``python -m unet3d_dist.prepare --verify DATASET`` checks every shard against the manifest.

The building itself (parallel, resumable, atomic; bad cases skipped with one sentence, exit status 3) is
``preparation/build.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

from .exit_codes import run_command
from .preparation.build import prepare, verify
from .preparation.recipe import load_recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="unet3d-prepare",
        description="Prepare scans into a sharded HDF5 dataset, or --verify one.",
        epilog=(
            "example: python -m unet3d_dist.prepare --config configs/prepare_la_mri.yaml --input "
            "data/raw/la_mri --out data/la_mri"
        ),
    )
    parser.add_argument("--config", type=Path, help="prepare recipe (YAML), e.g. configs/prepare_ct_liver.yaml")
    parser.add_argument(
        "--input", type=Path, nargs="+", help="input folder(s): case folders, a Decathlon task, or HDF5 files"
    )
    parser.add_argument("--out", type=Path, help="dataset folder to create")
    parser.add_argument(
        "--splits",
        type=Path,
        help="YAML/JSON split file {train: [ids], val: [ids], test: [ids]}; replaces the recipe's fractions",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="cases prepared at once, one per process (default: CPU count, at most 8)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset (or discard an unfinished one) at --out"
    )
    parser.add_argument(
        "--verify", type=Path, metavar="DATASET", help="check every shard of DATASET against its manifest and exit"
    )
    args = parser.parse_args(argv)
    if args.verify is None and not (args.config and args.input and args.out):
        parser.error("--config, --input and --out are required (or --verify DATASET)")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command(lambda: prepare_command(args))


def prepare_command(args: argparse.Namespace) -> int:
    """--verify, or prepare the dataset; an interrupt says how to resume. The exit code."""
    console = Console(soft_wrap=True)  # long paths stay whole, for copying
    if args.verify is not None:
        return verify(args.verify, console)
    try:
        return prepare(
            load_recipe(args.config),
            args.input,
            args.out,
            jobs=args.jobs,
            overwrite=args.overwrite,
            split_file=args.splits,
            console=console,
        )
    except KeyboardInterrupt:
        print(
            f"interrupted: finished shards stay in {args.out}.partial; run the same command to resume", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    main()
