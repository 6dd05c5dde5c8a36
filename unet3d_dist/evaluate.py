"""Distributed evaluation: whole volumes split across ranks, sliding-window prediction, records gathered on rank 0."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.shards import ShardedDataset
from .dist import DistEnv, gather_to_main
from .inference import predict_labels, sliding_window_logits


def balanced_shards(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Split cases into ``world_size`` disjoint lists with similar voxel totals (largest first, to the lightest rank).

    Every case lands on exactly one rank, whatever the world size; ranks may get no case at all.
    """
    shards: list[list[str]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for case_id in sorted(sizes, key=lambda c: (-sizes[c], c)):
        rank = load.index(min(load))
        shards[rank].append(case_id)
        load[rank] += sizes[case_id]
    return shards


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty (nothing to find, nothing found)."""
    intersection = np.count_nonzero(prediction & reference)
    total = np.count_nonzero(prediction) + np.count_nonzero(reference)
    return 1.0 if total == 0 else float(2.0 * intersection / total)


def evaluate_cases(
    model: nn.Module,
    dataset: ShardedDataset,
    case_ids: list[str],
    env: DistEnv,
    *,
    patch: tuple[int, int, int],
    overlap: float = 0.5,
    batch_size: int = 2,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> list[dict[str, Any]] | None:
    """Per-volume, per-class Dice records on rank 0 (None on other ranks). No collective inside the case loop."""
    sizes = {c: int(np.prod(dataset.records[c]["shape"])) for c in case_ids}
    mine = balanced_shards(sizes, env.world_size)[env.rank]
    was_training = model.training
    model.eval()
    records = []
    try:
        for case_id in mine:
            start = time.perf_counter()
            image = torch.from_numpy(dataset.image(case_id))[None]
            reference = dataset.label(case_id)
            logits = sliding_window_logits(
                model,
                image,
                patch,
                dataset.num_classes,
                overlap=overlap,
                batch_size=batch_size,
                pad_value=dataset.records[case_id].get("image_min", 0.0),
                amp_dtype=amp_dtype,
                device=env.device,
                channels_last=channels_last,
            )
            prediction = predict_labels(logits)
            seconds = time.perf_counter() - start
            for cls in range(1, dataset.num_classes):
                records.append(
                    {
                        "case": case_id,
                        "class": dataset.classes[cls],
                        "dice": dice(prediction == cls, reference == cls),
                        "seconds": seconds,
                    }
                )
    finally:
        model.train(was_training)
    gathered = gather_to_main(records)
    return None if gathered is None else [r for part in gathered for r in part]
