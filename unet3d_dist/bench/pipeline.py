"""Training-loop efficiency: the real loop (DataLoader + train_step) against the pure step on in-memory tensors.

Both use the same Trainer, built from the same config (the default run unless --config / overrides say otherwise),
so the only difference is waiting for data. Efficiency = pure step time / real step time; target >= 0.95.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ..config import load_config
from ..dist import distributed
from ..train import Trainer
from .common import report, timeit


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet3d_dist.bench pipeline", description=__doc__)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--steps", type=int, default=30, help="measured steps (after 3 warm-up steps)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/pipeline.json"))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as runs:
        cfg = load_config(args.config, [*args.overrides, f"log.runs_dir={runs}", "log.wandb=disabled", "train.val_every=0"])
        with distributed(cfg.train.device, 120) as env:
            trainer = Trainer(cfg, env)
            warmup = 3
            steps = min(args.steps, trainer.steps_per_epoch - warmup)
            trainer.sampler.set_epoch(0)
            batches = iter(trainer.loader)
            waiting = computing = 0.0
            for step in range(warmup + steps):
                start = time.perf_counter()
                image, label = next(batches)
                arrived = time.perf_counter()
                trainer.train_step(image, label)
                synchronize(env.device)
                if step >= warmup:
                    waiting += arrived - start
                    computing += time.perf_counter() - arrived
            pure = timeit(lambda: trainer.train_step(image, label), repeat=steps, warmup=0)["median_s"]
            workers = trainer.loader.num_workers
    real = (waiting + computing) / steps
    rows = [
        ["pure step (tensors in memory)", pure * 1e3, 1.0],
        ["real loop, per step", real * 1e3, pure / real],
        ["  of which waiting for data", waiting / steps * 1e3, waiting / (waiting + computing)],
    ]
    record = {
        "crop": cfg.data.crop, "batch": cfg.train.batch_size, "workers": workers, "steps": steps,
        "pure_ms": pure * 1e3, "real_ms": real * 1e3, "efficiency": pure / real, "data_wait_fraction": waiting / (waiting + computing),
    }
    title = f"Training loop, crop {'x'.join(map(str, cfg.data.crop))}, batch {cfg.train.batch_size}, {workers} loader workers: efficiency {pure / real:.3f}"
    report(title, ["measurement", "ms", "ratio"], rows, record, args.out)
