"""The dataset a run reads: a prepared folder, or the built-in synthetic phantom generated on first use."""

from __future__ import annotations

from rich.console import Console

from ..config import DataConfig
from ..dist import DistEnv, barrier
from .shards import ShardedDataset
from .synthetic import ensure_synthetic


def open_dataset(cfg: DataConfig, env: DistEnv) -> ShardedDataset:
    """The configured dataset; the synthetic phantom is generated once by each node's first rank."""
    if cfg.dataset != "synthetic":
        dataset = ShardedDataset(cfg.dataset)
        for note in (dataset.checksum_note, dataset.unchecked_note) if env.is_main else ():
            if note:  # prepared before chunk checksums or self-describing shards (the phantom has both)
                print(f"note: {note}")
        return dataset
    if env.local_rank == 0:
        console = Console(quiet=not env.is_main)
        phases = f", {cfg.synthetic_channels} phases" if cfg.synthetic_channels > 1 else ""
        with console.status(f"preparing the synthetic CT phantom ({cfg.synthetic_cases} cases{phases})"):
            ensure_synthetic(cfg.synthetic_dir, cfg.synthetic_cases, cfg.synthetic_channels)
    barrier()
    return ShardedDataset(ensure_synthetic(cfg.synthetic_dir, cfg.synthetic_cases, cfg.synthetic_channels))  # cached
