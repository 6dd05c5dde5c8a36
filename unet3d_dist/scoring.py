"""Distributed evaluation: each rank predicts its own whole volumes while worker processes score the previous ones.

Volumes are split across ranks by voxel count, without sampler padding, so every volume is evaluated exactly once
whatever the world size. No collective runs inside the volume loop: the records are gathered on rank 0 once, at
the end. Used by ``python -m unet3d_dist.evaluate`` and by the Trainer's validation.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.shards import ShardedDataset
from .dist import DistEnv, gather_to_main
from .ensemble import Member, ensemble_labels
from .inference import InferenceStopped, keep_largest_component, resample_to_shape, slabs_onto
from .masks import mask_path, save_mask
from .metrics import case_metrics
from .stop import STOP_SIGNALS


@dataclass(frozen=True)
class ScoringOptions:
    """How volumes are predicted, scored and kept; the defaults are validation's: Dice only, scored in-process. How
    each network looks at a volume (patch, flips, spacing) is its ``Member``'s."""

    overlap: float = 0.5
    batch_size: int = 2
    amp_dtype: torch.dtype | None = None
    stitch_device: str | None = None  # None: stitch on the inference device; "cpu" for large CT volumes
    distances: bool = False  # ASD, ASSD, HD95 and HD besides Dice and Jaccard
    metric_workers: int = 0  # processes per rank that score (and save) volumes; 0 scores in the rank's own process
    masks_dir: Path | None = None  # where predicted label maps are written; None keeps none
    mask_format: str = "nifti"
    largest_component: bool = False  # keep each class's largest connected component only
    stop_requested: Callable[[], bool] | None = None  # asked before each window batch: a stopping run ends early


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


class InlineExecutor(Executor):
    """Runs each job as it is submitted: Dice alone is not worth a second process."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


METRIC_WORKERS_MAX = 4  # each holds whole volumes; a rank scores one volume while it predicts the next


def default_metric_workers(loader_workers: int) -> int:
    return min(METRIC_WORKERS_MAX, loader_workers)


def metric_executor(workers: int) -> Executor:
    """Worker processes for scoring and mask writing, started by a forkserver: they never inherit torch's thread
    pools, CUDA context or process group from the rank, which a plain fork after those exist would copy.

    They ignore stop signals, which Slurm and torchrun send them along with their rank: stopping is the rank's job.
    """
    if workers == 0:
        return InlineExecutor()
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("forkserver"), initializer=ignore_stop_signals
    )


def ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def wait_for_room(jobs: list[Future], limit: int) -> None:
    """Block while more than ``limit`` jobs are unfinished, so predictions queued for the workers stay few."""
    while len(running := [job for job in jobs if not job.done()]) > limit:
        wait(running, return_when=FIRST_COMPLETED)


def predict_case(
    members: list[Member], dataset: ShardedDataset, case_id: str, options: ScoringOptions, device: torch.device
) -> np.ndarray:
    """Label map (x, y, z) of one whole volume, on the case's own grid, from the gaussian sliding window of each
    member, their softmax probabilities averaged.

    A member trained at another spacing sees the volume resampled to that spacing; its logits are resampled back
    (trilinear) before the softmax, so the scores are those of the case's own grid. Members on the case's own grid
    are stitched, averaged and turned into labels slab by slab along x, so memory does not hold the whole volume's
    logits or probabilities (a CT with many classes); a resampled member's are whole.
    """
    record = dataset.records[case_id]
    volume = torch.from_numpy(dataset.image(case_id))
    shape = tuple(volume.shape[1:])

    def own_grid(member: Member) -> bool:
        return not member.spacing or all(abs(a - b) <= 1e-6 for a, b in zip(record["spacing"], member.spacing))

    def window_options(member: Member) -> dict[str, Any]:
        return {
            "overlap": options.overlap,
            "batch_size": options.batch_size,
            "pad_value": dataset.pad_values(case_id),
            "tta_axes": member.tta_axes,
            "amp_dtype": options.amp_dtype,
            "device": device,
            "stitch_device": options.stitch_device,
            "channels_last": member.channels_last,
            "stop_requested": options.stop_requested,
        }

    def member_slabs(member: Member) -> Iterator[tuple[int, torch.Tensor]]:
        """Logits slab by slab; a member at another spacing predicts the volume resampled to it."""
        image = volume
        if not own_grid(member):
            image = resample_to_shape(
                volume, [max(1, round(n * s / m)) for n, s, m in zip(shape, record["spacing"], member.spacing)]
            )
        return slabs_onto(shape, member.model, image, member.patch, dataset.num_classes, **window_options(member))

    labels = ensemble_labels(shape, [member_slabs(member) for member in members])
    return keep_largest_component(labels) if options.largest_component else labels


def score_cases(
    members: list[Member], dataset: ShardedDataset, case_ids: list[str], env: DistEnv, options: ScoringOptions
) -> list[dict[str, Any]] | None:
    """Per-volume, per-class records of ``case_ids``, sorted by case, on rank 0 (None on other ranks)."""
    sizes = {c: int(np.prod(dataset.records[c]["shape"])) for c in case_ids}
    mine = balanced_shards(sizes, env.world_size)[env.rank]
    was_training = [member.model.training for member in members]
    for member in members:
        member.model.eval()
    scored: list[tuple[str, float, Future]] = []
    jobs: list[Future] = []
    try:
        with metric_executor(options.metric_workers) as pool:
            for case_id in mine:
                start = time.perf_counter()
                try:
                    prediction = predict_case(members, dataset, case_id, options, env.device)
                except InferenceStopped:
                    break  # the records so far are gathered as usual; the caller knows it asked to stop
                seconds = time.perf_counter() - start
                record = dataset.records[case_id]
                reference = dataset.label(case_id)
                jobs.append(
                    pool.submit(
                        case_metrics, prediction, reference, record["spacing"], dataset.classes, options.distances
                    )
                )
                scored.append((case_id, seconds, jobs[-1]))
                if options.masks_dir is not None:
                    jobs.append(
                        pool.submit(
                            save_mask, mask_path(options.masks_dir, case_id, options.mask_format), prediction, record
                        )
                    )
                wait_for_room(jobs, 2 * max(options.metric_workers, 1))
            for job in jobs:
                job.result()  # raises a worker's error here, on the rank that hit it
    finally:
        for member, training in zip(members, was_training):
            member.model.train(training)
    records = [{"case": case_id, **r, "infer_s": seconds} for case_id, seconds, job in scored for r in job.result()]
    gathered = gather_to_main(records)
    return None if gathered is None else sorted((r for part in gathered for r in part), key=lambda r: r["case"])
