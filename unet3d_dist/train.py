"""Training entry point: ``python -m unet3d_dist.train [--config FILE] [section.key=value ...]``.

Trains the residual 3D UNet as the recipe and the overrides say, as a single CPU/GPU process, under
``torchrun --nproc_per_node=N`` or under ``srun``; ``--help-config`` lists every key and ``--print-run-dir`` names
the run directory (for the launch scripts). The run: ``training.py`` (and the Trainer, ``trainer.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .exit_codes import run_command
from .training import train_command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="unet3d-train",
        description="Train the residual 3D UNet (single process, torchrun or srun).",
        epilog="Overrides: section.key=value, e.g. optim.lr=0.02 train.epochs=3. See --help-config for every key.",
    )
    parser.add_argument("--config", type=Path, help="YAML recipe, e.g. configs/debug.yaml")
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="list every key of the training config and of the prepare recipe with its default and doc",
    )
    parser.add_argument(
        "--print-run-dir",
        action="store_true",
        help="print the run directory these arguments select and exit (for launch scripts)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command(lambda: train_command(args))


if __name__ == "__main__":
    main()
