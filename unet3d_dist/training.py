"""A training run in this process's place in the job (``python -m unet3d_dist.train``), and the config's keys.

The same code runs as a single CPU/GPU process, under ``torchrun --nproc_per_node=N`` and under ``srun``; the
Trainer itself lives in ``trainer.py``. torch is imported only once a run starts, so ``--help``, ``--help-config``
and ``--print-run-dir`` (which the launch scripts call) answer at once. When another rank or node of the job ended
first, this rank ends with one line that says why (``peers.py``).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from .config import Config, describe, load_config
from .exit_codes import BadInput, said

if TYPE_CHECKING:
    from .dist import DistEnv


def train_command(args: argparse.Namespace) -> int:
    """What ``unet3d_dist.train``'s arguments ask for: the config's keys, the run directory, or the run. The exit
    code; a config that does not load raises its ConfigError."""
    if args.help_config:
        print(help_config())
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.print_run_dir:
        print(cfg.run_dir)
        return 0
    return train(cfg)


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
