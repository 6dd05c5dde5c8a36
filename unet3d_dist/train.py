"""Training entry point: ``python -m unet3d_dist.train [--config FILE] [section.key=value ...]``.

The same code runs as a single CPU/GPU process, under ``torchrun --nproc_per_node=N`` and under ``srun``. This
module is only the command line; the Trainer lives in ``trainer.py``. torch is imported only once a run starts, so
``--help``, ``--help-config`` and ``--print-run-dir`` (which the launch scripts call) answer at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, ConfigError, describe, load_config
from .exit_codes import BadInput, said

if TYPE_CHECKING:
    from .dist import DistEnv


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
    if args.help_config:
        print(help_config())
        return
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        sys.exit(said(err))
    if args.print_run_dir:
        print(cfg.run_dir)
        return
    sys.exit(train(cfg))


def help_config() -> str:
    """Both YAML files' keys in one place; the recipe is imported only here, as training never reads one."""
    from .preparation.recipe import Recipe

    return (
        f"training config (--config FILE, then section.key=value):\n{describe()}\n\n"
        f"prepare recipe (configs/prepare_*.yaml):\n{describe(Recipe)}"
    )


def train(cfg: Config) -> int:
    """Run the Trainer in this process's place in the job; the exit code (0, 75 after a stop, 2 on bad input or an
    output it cannot write)."""
    from .dist import runtime
    from .run_lock import removed_if_left_empty

    try:
        with removed_if_left_empty(cfg.run_dir), runtime(cfg.train.device, cfg.train.init_timeout_s) as env:
            return train_here(cfg, env)
    except BadInput as err:
        return said(err)


def train_here(cfg: Config, env: DistEnv) -> int:
    """This rank's part of the run. When another rank or node ended first, one line says why (peers.py)."""
    from .peers import end_after_peer, leave_error, lost_peer
    from .trainer import Trainer

    started, trainer = time.time(), None
    try:
        trainer = Trainer(cfg, env)
        return trainer.train()
    except RuntimeError as err:
        if not env.multi_rank:
            raise
        if lost_peer(err):
            return end_after_peer(cfg, env, None if trainer is None else trainer.state.global_step, err, started)
        if trainer is not None:  # set-up errors reach every rank alike; a training error may reach this one only
            leave_error(cfg.run_dir, env.rank, err)
        raise


if __name__ == "__main__":
    main()
