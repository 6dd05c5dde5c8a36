"""Which cases a run trains and validates on: the manifest's named splits, or one fold of a cross-validation.

With ``data.folds = k``, the cases of ``data.train_split`` are shuffled once with a fixed seed and dealt into k
folds; fold ``data.fold`` is held out for validation and the rest train. The assignment depends on the case ids
alone, so the trainer, the evaluator and the cross-validation driver agree on it.
"""

from __future__ import annotations

import numpy as np

from ..config import DataConfig
from .shards import ShardedDataset

FOLD_SEED = 12345


def fold_assignment(case_ids: list[str], folds: int) -> dict[str, int]:
    """Case id -> fold index, balanced (fold sizes differ by at most one)."""
    order = sorted(case_ids)
    np.random.default_rng(FOLD_SEED).shuffle(order)
    return {case_id: i % folds for i, case_id in enumerate(order)}


def run_cases(dataset: ShardedDataset, cfg: DataConfig, role: str) -> list[str]:
    """Case ids for ``role`` 'train' or 'val' under the data config (manifest splits or a CV fold)."""
    if not cfg.folds:
        return dataset.case_ids(cfg.train_split if role == "train" else cfg.val_split)
    pool = dataset.case_ids(cfg.train_split)
    assignment = fold_assignment(pool, cfg.folds)
    held_out = role == "val"
    return [c for c in pool if (assignment[c] == cfg.fold) == held_out]
