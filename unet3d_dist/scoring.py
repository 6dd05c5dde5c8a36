"""Distributed evaluation: each rank predicts its own whole volumes while worker processes score the previous ones.

Volumes are split across ranks by voxel count, without sampler padding, so every volume is evaluated exactly once
whatever the world size. No collective runs inside the volume loop: the records are gathered on rank 0 once, at
the end. Used by ``python -m unet3d_dist.evaluate`` and by the Trainer's validation.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data.shards import ShardedDataset
from .dist import DistEnv, gather_to_main
from .masks import mask_path, save_mask
from .metrics import case_metrics
from .segmenter import Segmenter
from .stop import STOP_SIGNALS
from .windows import InferenceStopped


@dataclass(frozen=True)
class ScoringOptions:
    """How predicted volumes are scored and kept; the defaults are validation's: Dice only, scored in-process. How
    volumes are predicted is the ``Segmenter``'s."""

    distances: bool = False  # ASD, ASSD, HD95 and HD besides Dice and Jaccard
    metric_workers: int = 0  # processes per rank that score (and save) volumes; 0 scores in the rank's own process
    masks_dir: Path | None = None  # where predicted label maps are written; None keeps none
    mask_format: str = "nifti"


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


def score_cases(
    segmenter: Segmenter, dataset: ShardedDataset, case_ids: list[str], env: DistEnv, options: ScoringOptions
) -> list[dict[str, Any]] | None:
    """Per-volume, per-class records of ``case_ids``, sorted by case, on rank 0 (None on other ranks)."""
    sizes = {c: int(np.prod(dataset.records[c]["shape"])) for c in case_ids}
    mine = balanced_shards(sizes, env.world_size)[env.rank]
    scored: list[tuple[str, float, Future]] = []
    jobs: list[Future] = []
    with metric_executor(options.metric_workers) as pool:
        for case_id in mine:
            start = time.perf_counter()
            record = dataset.records[case_id]
            try:
                prediction = segmenter.labels(dataset.image(case_id), record["spacing"], dataset.pad_values(case_id))
            except InferenceStopped:
                break  # the records so far are gathered as usual; the caller knows it asked to stop
            seconds = time.perf_counter() - start
            reference = dataset.label(case_id)
            jobs.append(
                pool.submit(case_metrics, prediction, reference, record["spacing"], dataset.classes, options.distances)
            )
            scored.append((case_id, seconds, jobs[-1]))
            if options.masks_dir is not None:
                where = mask_path(options.masks_dir, case_id, options.mask_format)
                jobs.append(pool.submit(save_mask, where, prediction, record))
            wait_for_room(jobs, 2 * max(options.metric_workers, 1))
        for job in jobs:
            job.result()  # raises a worker's error here, on the rank that hit it
    records = [{"case": case_id, **r, "infer_s": seconds} for case_id, seconds, job in scored for r in job.result()]
    gathered = gather_to_main(records)
    return None if gathered is None else sorted((r for part in gathered for r in part), key=lambda r: r["case"])
