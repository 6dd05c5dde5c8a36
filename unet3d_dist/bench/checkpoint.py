"""Checkpoint cost: save (atomic: temp file, fsync, rename, keep-k) and load time and size of a full training state.

The reference is a plain ``torch.save`` of the same state into memory, measured in the same run, so the table shows
what atomicity and the disk add on this machine.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import torch

from ..checkpoint import Checkpointer, load_checkpoint, read_checkpoint, rng_state, training_checkpoint
from ..config import Config
from ..model import build_model
from ..step import TrainStep
from .common import report, timeit


def training_state() -> dict:
    """A checkpoint as the trainer writes it, after one real training step so the momentum buffers exist."""
    cfg = Config()
    model = build_model(cfg.model, 1, 2)
    step = TrainStep(model, cfg, torch.device("cpu"), total_steps=100)
    image = torch.randn(1, 1, 32, 32, 32)
    step(image, (image[:, 0] > 1).long())
    train_state = {"epoch": 1, "step_in_epoch": 3, "global_step": 53, "best_dice": 0.5, "nonfinite_in_row": 0}
    dataset = {"classes": ["background", "foreground"], "modality": "CT", "preprocessing": {}}
    return training_checkpoint(step, train_state, [rng_state(torch.device("cpu"))], cfg, dataset, "bench")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet3d_dist.bench checkpoint", description=__doc__)
    parser.add_argument("--dir", type=Path, help="folder to write into (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/checkpoint.json"))
    args = parser.parse_args(argv)
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    state = training_state()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        checkpointer = Checkpointer(Path(tmp), keep_last=2)
        steps = iter(range(1, 10**6))
        save = timeit(lambda: checkpointer.save(state, next(steps)), repeat=5)
        path = checkpointer.latest()
        size = path.stat().st_size
        load = timeit(lambda: load_checkpoint(path), repeat=5)
        params = sum(p.numel() for p in read_checkpoint(path, resume=True).model(torch.device("cpu")).parameters())
    memory = timeit(lambda: torch.save(state, io.BytesIO()), repeat=5)
    rows = [
        ["torch.save to memory (reference)", memory["median_s"] * 1e3, 1.0],
        ["atomic save (tmp + fsync + rename + prune)", save["median_s"] * 1e3, save["median_s"] / memory["median_s"]],
        ["load (weights_only=True)", load["median_s"] * 1e3, load["median_s"] / memory["median_s"]],
    ]
    record = {"bytes": size, "model_parameters": params, "save": save, "load": load, "reference_in_memory": memory}
    report(
        f"Checkpoint of the default model ({size / 1e6:.1f} MB)",
        ["operation", "ms", "ratio to reference"],
        rows,
        record,
        args.out,
    )
