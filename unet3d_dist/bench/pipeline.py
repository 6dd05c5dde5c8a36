"""Training-loop efficiency: the real loop (DataLoader + train_step) against the pure step on in-memory tensors.

Both use the same Trainer, built from the same config (the default run unless --config / overrides say otherwise),
so the only difference is waiting for data. The pure steps are timed before and after the real ones. Efficiency =
median pure step time / median real step time (the same statistic on both sides, so one slow step of a shared
machine does not count against either); target >= 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import load_config
from ..dist import runtime, synchronize
from ..trainer import Trainer
from .common import report, timeit

WARMUP = 5  # steps before any is timed; they also let the CPU's kept heap settle (host_memory)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The run's config and overrides, and how many steps to time."""
    parser = argparse.ArgumentParser(prog="python -m unet3d_dist.bench pipeline", description=__doc__)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--steps", type=int, default=30, help=f"measured steps (after {WARMUP} warm-up steps)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/pipeline.json"))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def time_steps(trainer: Trainer, device: torch.device, steps: int) -> tuple[float, float, list[float], list[float]]:
    """Median pure step seconds before and after the real loop, and the real loop's data waits and step totals. Pure
    steps come before and after the real ones, so a drift in the machine's speed does not pass for data waits."""
    trainer.sampler.set_epoch(0)
    batches = trainer.batches()
    image, label = next(batches)

    def pure_block() -> float:
        return timeit(lambda: trainer.step(image, label), repeat=steps, warmup=0)["median_s"]

    for _ in range(WARMUP):
        trainer.step(*next(batches))
    pure_before = pure_block()
    waits, totals = [], []
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(batches)
        arrived = time.perf_counter()
        trainer.step(*batch)
        synchronize(device)
        waits.append(arrived - start)
        totals.append(time.perf_counter() - start)
    return pure_before, pure_block(), waits, totals


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as runs:
        cfg = load_config(
            args.config, [*args.overrides, f"log.runs_dir={runs}", "log.wandb=disabled", "train.val_every=0"]
        )
        with runtime(cfg.train.device, 120) as env:
            trainer = Trainer(cfg, env)
            steps = min(args.steps, trainer.steps_per_epoch - WARMUP - 1)
            pure_before, pure_after, waits, totals = time_steps(trainer, env.device, steps)
            pure = (pure_before + pure_after) / 2
            workers = trainer.loader.num_workers
    real, wait_fraction = statistics.median(totals), sum(waits) / sum(totals)
    rows = [
        ["pure step (tensors in memory)", pure * 1e3, 1.0],
        ["real loop, per step", real * 1e3, pure / real],
        ["  waiting for data, mean per step", statistics.mean(waits) * 1e3, wait_fraction],
    ]
    record = {
        "crop": cfg.data.crop,
        "batch": cfg.train.batch_size,
        "workers": workers,
        "steps": steps,
        "pure_ms": pure * 1e3,
        "pure_before_ms": pure_before * 1e3,
        "pure_after_ms": pure_after * 1e3,
        "real_ms": real * 1e3,
        "real_mean_ms": statistics.mean(totals) * 1e3,
        "efficiency": pure / real,
        "data_wait_fraction": wait_fraction,
    }
    title = (
        f"Training loop, crop {'x'.join(map(str, cfg.data.crop))}, batch {cfg.train.batch_size}, {workers} loader "
        f"workers: efficiency {pure / real:.3f}"
    )
    report(title, ["measurement", "ms", "ratio"], rows, record, args.out)
