"""Training entry point: ``python -m unet3d_dist.train [--config FILE] [section.key=value ...]``.

The same code runs as a single CPU/GPU process, under ``torchrun --nproc_per_node=N`` and under ``srun``. This
module is only the command line; the Trainer lives in ``trainer.py``. torch is imported only once a run starts, so
``--help``, ``--help-config`` and ``--print-run-dir`` (which the launch scripts call) answer at once.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, ConfigError, describe, load_config

if TYPE_CHECKING:
    from .dist import DistEnv
    from .trainer import Trainer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="unet3d-train",
        description="Train the residual 3D UNet (single process, torchrun or srun).",
        epilog="Overrides: section.key=value, e.g. optim.lr=0.02 train.epochs=3. See --help-config for every key.",
    )
    parser.add_argument("--config", type=Path, help="YAML recipe, e.g. configs/debug.yaml")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and doc")
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
        print(describe())
        return
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        sys.exit(fail(err))
    if args.print_run_dir:
        print(cfg.run_dir)
        return
    sys.exit(train(cfg))


def train(cfg: Config) -> int:
    """Run the Trainer in this process's place in the job; the exit code (0, 75 after a stop, 2 on bad input or an
    output it cannot write)."""
    from .checkpoint import CheckpointError
    from .data.shards import DatasetError
    from .dist import runtime
    from .files import OutputError
    from .optional import MissingDependency
    from .run_lock import removed_if_left_empty
    from .trainer import NonFiniteLossError

    try:
        with runtime(cfg.train.device, cfg.train.init_timeout_s) as env:
            with removed_if_left_empty(cfg.run_dir, env.is_main):
                return train_here(cfg, env)
    except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError, OutputError, MissingDependency) as err:
        return fail(err)


def train_here(cfg: Config, env: DistEnv) -> int:
    """This rank's part of the run; a lost peer (another rank or node ended) is one sentence and exit 75."""
    from .dist import lost_peer
    from .trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg, env)
        return trainer.train()
    except RuntimeError as err:
        if env.world_size == 1 or not lost_peer(err):
            raise
        return peer_lost(cfg, trainer, err)


def peer_lost(cfg: Config, trainer: Trainer | None, err: RuntimeError) -> int:
    """One line when another rank or node of the job ended mid-run (the collectives fail on every rank left);
    exit code 75, as after a stop: the same command, on every node, resumes from the latest checkpoint."""
    from .checkpoint import Checkpointer
    from .trainer import REQUEUE_EXIT_CODE

    where = f" at step {trainer.state.global_step}" if trainer is not None else " while starting"
    latest = Checkpointer(cfg.run_dir, cfg.checkpoint.keep_last).latest()
    resume = f"resumes from {latest.name}" if latest else "starts afresh (no checkpoint yet)"
    reason = re.sub(r"^\[[^]]*\]\s*", "", str(err).splitlines()[0]).split(". ")[0]  # gloo starts with its source line
    print(
        f"error: another process of the job ended{where} ({reason}): a node or rank was "
        f"lost; run the same command on every node: it {resume} in {cfg.run_dir}",
        file=sys.stderr,
    )
    return REQUEUE_EXIT_CODE


def fail(err: Exception) -> int:
    """One line on stderr for input the run cannot use or an output it cannot write; exit code 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
