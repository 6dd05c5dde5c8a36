"""The resident data path (``data.resident``): the train cases live on the training device, and crops are cut there.

Loader workers read every crop from the shards and send it to the device, one host-to-device copy per batch; at GPU
step times that takes many cores. When the train cases fit on the device, each rank loads them there once and
makes its batches in its own process with no workers: CropDataset draws each crop exactly as the workers would
(the same (seed, epoch, index) generator, reading device tensors instead of shards) and ``finish_batch`` resamples
and changes intensity on the device. Batches follow the same EpochSampler as the DataLoader, so a resumed run
continues at the next crop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ..batching import chunks
from ..config import Config
from .crops import EpochSampler, training_crops
from .device_augment import collate_parts, finish_batch
from .shards import ShardedDataset

SHARE_OF_FREE = 0.25  # data.resident=auto: the cases may take at most this share of the device's free memory


def resident_bytes(dataset: ShardedDataset, case_ids: list[str]) -> int:
    """What the cases take on the device: images in float32 (every channel) and labels in uint8."""
    per_voxel = 4 * len(dataset.channels) + 1
    return sum(math.prod(dataset.records[case]["shape"]) * per_voxel for case in case_ids)


def resident_reason(setting: str, device: torch.device, nbytes: int, augment_device: str = "auto") -> str | None:
    """Why the cases go on ``device`` (a phrase for the console), or None when they stay in the shards: ``on`` and
    ``off`` as set; ``auto`` on a CUDA device whose free memory is at least 1 / SHARE_OF_FREE times ``nbytes``,
    unless augmentation was asked of the CPU (``data.augment_device=cpu``: the loader workers' job)."""
    if setting != "auto":
        return "data.resident=on" if setting == "on" else None
    if device.type != "cuda" or augment_device == "cpu":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > SHARE_OF_FREE * free:
        return None
    return f"auto: {100 * nbytes / free:.1f} % of the free device memory, at most {100 * SHARE_OF_FREE:.0f} %"


class ResidentCases:
    """Cases held on ``device``, read as CropDataset reads a ShardedDataset: regions come back as views of the
    device tensors; records, pad values and foreground tables stay on the host, where the crop draws read them."""

    def __init__(self, dataset: ShardedDataset, case_ids: list[str], device: torch.device):
        self.device = device
        self.records = {case: dataset.records[case] for case in case_ids}
        self.images = {case: torch.from_numpy(dataset.image(case)).to(device) for case in case_ids}
        self.labels = {case: torch.from_numpy(dataset.label(case)).to(device) for case in case_ids}
        self.tables = {case: dataset.foreground(case) for case in case_ids}
        self.pads = {case: dataset.pad_values(case) for case in case_ids}

    def image(self, case_id: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """(C, X, Y, Z) voxels; ``index`` selects in (x, y, z) only."""
        return self.images[case_id][(slice(None), *index)]

    def label(self, case_id: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        return self.labels[case_id][index]

    def foreground(self, case_id: str) -> np.ndarray:
        return self.tables[case_id]

    def pad_values(self, case_id: str) -> list[float]:
        return self.pads[case_id]


class ResidentLoader:
    """Finished batches (image (N, C, X, Y, Z), label (N, X, Y, Z)) on the device, made in this process from the
    resident cases, for the keys of ``sampler`` in its order; an incomplete last batch is dropped, as the
    DataLoader's ``drop_last`` does."""

    num_workers = 0  # what a DataLoader would report: no worker processes

    def __init__(
        self, dataset: ShardedDataset, case_ids: list[str], cfg: Config, sampler: EpochSampler, device: torch.device
    ):
        self.cases = ResidentCases(dataset, case_ids, device)
        self.crops = training_crops(self.cases, case_ids, cfg, finish_on_device=True)
        self.sampler, self.batch_size, self.device = sampler, cfg.train.batch_size, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in chunks(self.sampler, self.batch_size):
            yield finish_batch(collate_parts([self.crops[key] for key in batch]), self.crops.crop, self.device)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size
