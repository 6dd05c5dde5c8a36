"""Loader throughput: crops per second of one loader worker at a recipe's crop and augmentation, the workers a GPU
needs, and the resident path's rate: ``python -m unet3d_dist.bench loader [--config RECIPE] [--dataset DIR]
[--step-ms 15]``.

A worker's rate is crops per CPU second in this process (what a worker with a core of its own delivers), for plain
crops, for the recipe's augmentation done in the workers (data.augment_device=cpu), and for the workers' share when
the training device finishes the crops (=device); the device's own share is timed on this machine's device. The
resident path (data.resident=on) is timed as a run gets it: crops per wall-clock second in this one process,
drawing and finishing on the device included. The reference is the plain crop, measured in the same run; what a GPU
needs is its batch / step time, and workers needed = that / one worker's rate.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from ..config import Config, load_config
from ..data.augment import Augmentation
from ..data.crops import CropDataset, EpochSampler
from ..data.device_augment import collate_parts, finish_batch
from ..data.resident import ResidentLoader
from ..data.shards import ShardedDataset
from ..data.synthetic import ensure_synthetic
from ..dist import synchronize
from .common import report


def crops_per_cpu_second(crops: CropDataset, count: int) -> float:
    crops[(99, 0)]  # open the shard handles outside the measurement
    start = time.process_time()
    for index in range(count):
        crops[(0, index)]
    return count / (time.process_time() - start)


def device_seconds_per_crop(crops: CropDataset, count: int, batch: int, device: torch.device) -> float:
    """Seconds the training device spends finishing one crop (resampling and intensity), batch by batch."""
    batches = [collate_parts([crops[(0, i + j)] for j in range(batch)]) for i in range(0, count, batch)]
    finish_batch(batches[0], crops.crop, device)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for parts in batches:
        finish_batch(parts, crops.crop, device)
    synchronize(device)
    return (time.perf_counter() - start) / (len(batches) * batch)


def recipe_data(recipe: Path, dataset: Path, overrides: list[str] | None) -> tuple[Config, ShardedDataset, list[str]]:
    """The recipe with ``overrides``, the dataset, and the cases its crops come from (its train split, else all)."""
    cfg = load_config(recipe, [f"data.dataset={dataset}", *(overrides or [])])
    data = ShardedDataset(dataset)
    return cfg, data, data.case_ids(cfg.data.train_split) or data.case_ids()


def resident_crops_per_s(
    recipe: Path, dataset: Path, count: int, batch: int, device: torch.device, overrides: list[str] | None = None
) -> float:
    """Crops per wall-clock second the resident path delivers on ``device`` in this process, drawing and finishing
    included, over at least ``count`` crops in batches of ``batch`` (loading the cases and one batch not timed)."""
    steps = max(1, math.ceil(count / batch))
    sizes = [f"train.batch_size={batch}", f"data.samples_per_epoch={(steps + 1) * batch}"]
    cfg, data, ids = recipe_data(recipe, dataset, [*(overrides or []), *sizes])
    sampler = EpochSampler(cfg.data.samples_per_epoch, 1, 0, cfg.train.seed)
    batches = iter(ResidentLoader(data, ids, cfg, sampler, device))
    next(batches)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def measure(
    recipe: Path,
    dataset: Path,
    count: int,
    batch: int,
    step_ms: float,
    device: torch.device,
    overrides: list[str] | None = None,
) -> dict:
    """One worker's rates on each path, the device's share of finishing, and the workers a GPU needs."""
    cfg, data, ids = recipe_data(recipe, dataset, overrides)
    d = cfg.data
    augmentation = Augmentation(d.rotate_deg, d.scale, d.spatial_prob, d.intensity_aug)

    def crops(aug: Augmentation | None, on_device: bool = False) -> CropDataset:
        return CropDataset(
            data, ids, d.crop, count + 100, cfg.train.seed, d.foreground_fraction, d.flip_axis_indices, aug, on_device
        )

    rates = {
        "plain crops": crops_per_cpu_second(crops(None), count),
        "augmented in the workers (cpu)": crops_per_cpu_second(crops(augmentation), count),
        "augmented, the workers' share (device)": crops_per_cpu_second(crops(augmentation, True), count),
    }
    needed = batch / (step_ms / 1e3)
    return {
        "recipe": str(recipe),
        "crop": list(d.crop),
        "augmentation": vars(augmentation),
        "crops_per_worker_per_s": rates,
        "device": device.type,
        "device_ms_per_crop": 1e3 * device_seconds_per_crop(crops(augmentation, True), min(count, 16), batch, device),
        "step_ms": step_ms,
        "batch": batch,
        "crops_needed_per_s": needed,
        "workers_needed": {name: math.ceil(needed / rate) for name, rate in rates.items()},
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet3d_dist.bench loader", description=__doc__)
    parser.add_argument(
        "--config", type=Path, default=Path("configs/la_mri.yaml"), help="training recipe (crop, augmentation)"
    )
    parser.add_argument("--dataset", type=Path, help="prepared dataset (default: the synthetic phantom)")
    parser.add_argument("--crops", type=int, default=40, help="crops per measurement")
    parser.add_argument("--batch", type=int, default=2, help="crops per step on one GPU")
    parser.add_argument("--step-ms", type=float, default=15.0, help="GPU step time the loader has to keep up with")
    parser.add_argument("--out", type=Path, default=Path("bench-results/loader.json"))
    args = parser.parse_args(argv)
    dataset = args.dataset or ensure_synthetic("~/.cache/unet3d_dist/synthetic", 24)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = measure(args.config, dataset, args.crops, args.batch, args.step_ms, device)
    record["resident_crops_per_s"] = resident_crops_per_s(args.config, dataset, args.crops, args.batch, device)
    needed, plain = record["crops_needed_per_s"], record["crops_per_worker_per_s"]["plain crops"]
    rows = [
        [f"one worker: {name}", rate, rate / plain, rate / needed, record["workers_needed"][name]]
        for name, rate in record["crops_per_worker_per_s"].items()
    ]
    rows.append([f"device share of finishing, ms per crop ({device.type})", record["device_ms_per_crop"], "", "", ""])
    resident = record["resident_crops_per_s"]
    record["resident_ratio_to_needed"] = resident / needed
    name = f"resident on {device.type}: one process, wall clock"
    rows.append([name, resident, resident / plain, record["resident_ratio_to_needed"], 0])
    title = (
        f"Loader, {'x'.join(map(str, record['crop']))} crops of {args.config}: a GPU at {args.step_ms:g} ms per "
        f"step of {args.batch} crops needs {needed:.0f} crops/s"
    )
    columns = ["path", "crops/s (a worker's: per CPU s)", "ratio to plain", "ratio to needed", "workers per GPU"]
    report(title, columns, rows, record, args.out)
