"""The run's global batch: fixed for the whole run, whatever number of ranks trains it.

A run is defined by G crops per optimizer step, trained in groups of ``train.batch_size`` (B, the micro-batch whose
Dice pools its crops). On W ranks each takes G / (B * W) groups per step, accumulating their gradients, so the LR
schedule, the crops of every step and the loss are the same on any W that divides the G / B groups.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TypeVar

from .config import ConfigError

Item = TypeVar("Item")


def chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive lists of ``size`` items; an incomplete last one is dropped, as the DataLoader's drop_last does."""
    iterator = iter(items)
    while len(chunk := list(itertools.islice(iterator, size))) == size:
        yield chunk


def world_sizes_that_work(global_batch: int, batch: int) -> list[int]:
    """The world sizes over which ``global_batch`` crops divide into whole groups of ``batch`` per rank."""
    groups = global_batch // batch if global_batch % batch == 0 else 0
    return [w for w in range(1, groups + 1) if groups % w == 0]


def check_divides(global_batch: int, batch: int, world_size: int, where: str = "this run") -> None:
    """Refuse, in one sentence naming the world sizes that work, a global batch that does not divide over ranks."""
    if global_batch % batch:
        raise ConfigError(
            f"train.global_batch={global_batch} is not a whole number of train.batch_size={batch} groups; "
            f"use a multiple of {batch}"
        )
    if (global_batch // batch) % world_size:
        works = ", ".join(map(str, world_sizes_that_work(global_batch, batch)))
        raise ConfigError(
            f"train.global_batch={global_batch} in groups of train.batch_size={batch} does not divide over the "
            f"{world_size} ranks of {where}; world sizes that work: {works}"
        )


def accumulation(global_batch: int, batch: int, world_size: int) -> int:
    """Micro-batches each rank trains per optimizer step."""
    return global_batch // (batch * world_size)
