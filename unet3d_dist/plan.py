"""Planning: ``python -m unet3d_dist.plan --input FOLDER... --out PLAN [--recipe BASE.yaml]``.

Plans a prepare recipe and a training config from a source data set's fingerprint, a time budget for the whole model
(``--minutes``, every fold included) and the step time of this machine or of the one that will train
(``--step-seconds``), writes them with the reasons for each choice into PLAN, and prepares the data set there
(unless ``--no-prepare``).
What PLAN holds and where the rules are: ``planning/plan_folder.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .exit_codes import run_command
from .planning.plan_folder import plan_and_prepare


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="unet3d-plan",
        description="Plan a prepare recipe and a training config that spend a time budget for the whole model on a "
        "data set, from its fingerprint, then prepare it.",
        epilog="example: python -m unet3d_dist.plan --input /data/Task02_Heart --out plans/heart",
    )
    parser.add_argument("--input", type=Path, nargs="+", required=True, help="source folder(s), as for prepare")
    parser.add_argument("--out", type=Path, required=True, help="folder of the plan and of data/, the prepared set")
    parser.add_argument(
        "--recipe", type=Path, help="base prepare recipe; its input, labels, name and modality are kept"
    )
    parser.add_argument("--modality", help="CT, MRI, ... (default: the base recipe's or dataset.json's)")
    parser.add_argument(
        "--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="target spacing in mm (default: planned)"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=100.0,
        help="wall time of the whole model, every fold included, on the machine that trains (default 100)",
    )
    parser.add_argument(
        "--step-seconds",
        type=float,
        help="seconds of one reference step (2 crops of 64x64x40, default network) on the machine that will train, "
        "e.g. a GPU: bench train_step --crop 64 64 40 --batch 2 there (default: measured here)",
    )
    parser.add_argument(
        "--final",
        choices=("auto", "all", "folds"),
        default="auto",
        help="the model the budget trains: one on every case, a 5-fold ensemble, or as the budget says (default)",
    )
    parser.add_argument("--memory-gb", type=float, help="memory budget (default: 85%% of the GPU's, or half the RAM)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where training will run")
    parser.add_argument("--no-prepare", action="store_true", help="write the plan only, not data/")
    parser.add_argument("--jobs", type=int, default=1, help="cases prepared at once (as prepare --jobs)")
    parser.add_argument("--overwrite", action="store_true", help="replace the plan and data set already at --out")
    args = parser.parse_args(argv)
    given = [args.minutes, args.memory_gb, args.step_seconds, *(args.spacing or [])]
    if any(value is not None and value <= 0 for value in given):
        parser.error("--minutes, --memory-gb, --step-seconds and --spacing must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command(lambda: plan_and_prepare(args))


if __name__ == "__main__":
    main()
