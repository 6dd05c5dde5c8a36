"""Random training crops, each a pure function of (seed, epoch, sample index).

Because nothing else feeds the random draw, the same crops come back whatever the number of DataLoader workers or
ranks, and a run resumed in the middle of an epoch sees exactly the crops it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..batching import check_divides
from ..config import Config
from ..preparation.preprocess import axes_smaller, dims
from .augment import (
    Augmentation,
    augment_intensity,
    crop_region,
    flipped_affine,
    padding,
    spatial_matrix,
    transformed_crop,
)
from .device_augment import collate_parts, crop_parts, draw_for_device
from .shards import ShardedDataset

if TYPE_CHECKING:
    from .resident import ResidentCases

Array: TypeAlias = np.ndarray | torch.Tensor  # what a crop source reads: numpy from shards, tensors when resident


class CropDataset(Dataset):
    """Crops of ``crop`` voxels; ``foreground_fraction`` of them centred on a foreground voxel; random flips, and
    optionally rotation/scaling and intensity changes (see augment.py).

    Items are addressed by ``(epoch, index)``; index ``i`` reads case ``i % len(case_ids)``, so every epoch visits all
    cases evenly. Volumes smaller than the crop are padded with each channel's minimum intensity and label 0.

    ``dataset`` is the source the crops read: a ShardedDataset (numpy arrays from the shards), or the device-resident
    cases of resident.py (tensors on their ``device``), whose crops are drawn by this same code.
    """

    def __init__(
        self,
        dataset: ShardedDataset | ResidentCases,
        case_ids: list[str],
        crop: tuple[int, int, int],
        samples_per_epoch: int,
        seed: int,
        foreground_fraction: float = 1 / 3,
        flip_axes: tuple[int, ...] = (0, 1, 2),
        augmentation: Augmentation | None = None,
        finish_on_device: bool = False,
    ):
        if not case_ids:
            raise ValueError("CropDataset needs at least one case")
        self.dataset = dataset
        self.case_ids = list(case_ids)
        self.crop = tuple(crop)
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.foreground_fraction = foreground_fraction
        self.flip_axes = tuple(flip_axes)
        self.augmentation = augmentation or Augmentation()
        self.finish_on_device = finish_on_device  # resampling and intensity on the training device (device_augment)
        self.device: torch.device | None = getattr(dataset, "device", None)  # None: the source reads numpy arrays

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | dict[str, Any]:
        """The crop (image (C, X, Y, Z), label); with ``finish_on_device``, its parts for the training device."""
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        case_id = self.case_ids[index % len(self.case_ids)]
        record = self.dataset.records[case_id]
        shape = record["shape"]
        start = self.crop_start(rng, case_id, shape)
        pad = self.dataset.pad_values(case_id)
        matrix = spatial_matrix(rng, self.augmentation)
        affine = None  # on the device path: how to sample the crop from the region read
        if matrix is None:
            image, label = self.read_padded(case_id, shape, start, pad)
        else:
            centre = np.asarray(start) + (np.asarray(self.crop) - 1) / 2
            if self.finish_on_device:
                image, label, affine = self.read_region(case_id, shape, centre, matrix, pad)
            else:
                read = lambda region: (self.dataset.image(case_id, region), self.dataset.label(case_id, region))  # noqa: E731
                image, label = transformed_crop(read, shape, centre, self.crop, matrix, pad)
        if self.flip_axes:
            draws = rng.random(3)  # one per axis whichever may flip, so each axis keeps its draw
            axes = tuple(a for a in self.flip_axes if draws[a] < 0.5)
            if axes and affine is not None:
                affine = flipped_affine(*affine, axes, self.crop)
            elif axes:
                image, label = flip_crop(image, label, axes)
        if self.finish_on_device:
            draws = draw_for_device(rng, len(pad)) if self.augmentation.intensity else None
            return crop_parts(image, label, affine, pad, draws)
        if self.augmentation.intensity:
            image = augment_intensity(image, rng)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(label))

    def read_region(
        self, case_id: str, shape: list[int], centre: np.ndarray, matrix: np.ndarray, pad: list[float]
    ) -> tuple[Array, Array, tuple[np.ndarray, np.ndarray] | None]:
        """The region a rotated/scaled crop reads, and the affine map the device samples it with; a crop wholly
        outside the volume is the padding itself (no map)."""
        found = crop_region(shape, centre, self.crop, matrix)
        if found is None:
            return (*blank_crop(pad, self.crop, self.device), None)
        region, offset = found
        return self.dataset.image(case_id, region), self.dataset.label(case_id, region), (matrix, offset)

    def crop_start(self, rng: np.random.Generator, case_id: str, shape: list[int]) -> list[int]:
        """Corner of the crop; may be negative (padding) when the volume is smaller than the crop."""
        low = [min(0, s - c) for s, c in zip(shape, self.crop)]
        high = [max(0, s - c) for s, c in zip(shape, self.crop)]
        foreground = rng.random() < self.foreground_fraction
        if foreground:
            table = self.dataset.foreground(case_id)
            if len(table):
                classes = np.unique(table[:, 0])
                rows = table[table[:, 0] == rng.choice(classes)]
                centre = rows[rng.integers(len(rows)), 1:]
                return [int(np.clip(p - c // 2, lo, hi)) for p, c, lo, hi in zip(centre, self.crop, low, high)]
        return [int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high)]

    def read_padded(self, case_id: str, shape: list[int], start: list[int], pad: list[float]) -> tuple[Array, Array]:
        src = tuple(slice(max(b, 0), min(b + c, s)) for b, c, s in zip(start, self.crop, shape))
        image = self.dataset.image(case_id, src)
        label = self.dataset.label(case_id, src)
        if label.shape == self.crop:
            return image, label
        dst = tuple(slice(sl.start - b, sl.stop - b) for sl, b in zip(src, start))
        padded_image, padded_label = blank_crop(pad, self.crop, self.device)
        padded_image[(slice(None), *dst)], padded_label[dst] = image, label
        return padded_image, padded_label


def blank_crop(pad: list[float], crop: tuple[int, ...], device: torch.device | None) -> tuple[Array, Array]:
    """A crop of padding alone (each channel's pad value, background): numpy arrays, or tensors made on ``device``
    from Python numbers (no copy from the host)."""
    if device is None:
        return padding(pad, crop), np.zeros(crop, np.uint8)
    image = torch.empty((len(pad), *crop), dtype=torch.float32, device=device)
    for channel, value in zip(image, pad):
        channel.fill_(value)
    return image, torch.zeros(crop, dtype=torch.uint8, device=device)


def flip_crop(image: Array, label: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Image (C, ...) and label mirrored along ``axes``, numpy arrays or tensors alike."""
    if isinstance(label, torch.Tensor):
        return image.flip([a + 1 for a in axes]), label.flip(axes)
    return np.flip(image, tuple(a + 1 for a in axes)), np.flip(label, axes)


class EpochSampler(Sampler):
    """This rank's ``(epoch, index)`` keys in the run's global crop order, which no world size changes.

    An epoch is the first floor(length / G) * G positions of a permutation seeded by (seed, epoch) (the one
    DistributedSampler draws), G the global batch. Global step s trains positions s*G to s*G + G - 1 in groups of
    ``batch`` (the micro-batch B): group g is positions s*G + g*B to s*G + (g+1)*B - 1, and rank r of W takes
    groups r, r + W, r + 2W, ... of every step. So each step trains the same crops in the same groups on any
    number of ranks; on one rank the order is the permutation's. ``skip`` (in samples of the global order, a
    multiple of G) resumes mid-epoch. The epoch travels inside the key, so persistent DataLoader workers need no
    notification of a new epoch.
    """

    def __init__(
        self, length: int, world_size: int, rank: int, seed: int, batch: int = 1, global_batch: int | None = None
    ):
        self.length, self.world_size, self.rank, self.seed = length, world_size, rank, seed
        self.batch, self.global_batch = batch, global_batch or batch * world_size
        check_divides(self.global_batch, batch, world_size)
        self.steps = length // self.global_batch  # steps per epoch
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        groups = self.global_batch // self.batch
        for step in range(self.skip // self.global_batch, self.steps):
            for group in range(self.rank, groups, self.world_size):
                start = step * self.global_batch + group * self.batch
                for index in order[start : start + self.batch]:
                    yield self.epoch, index

    def __len__(self) -> int:
        return (self.steps - self.skip // self.global_batch) * self.global_batch // self.world_size


def training_loader(
    dataset: ShardedDataset,
    case_ids: list[str],
    cfg: Config,
    sampler: EpochSampler,
    workers: int,
    finish_on_device: bool,
    pin_memory: bool,
    worker_init_fn: Callable[[int], None],
) -> DataLoader:
    """The training crops of ``case_ids`` in the sampler's order, from ``workers`` processes kept across epochs;
    with ``finish_on_device`` the workers leave resampling and intensity changes to the training device."""
    return DataLoader(
        training_crops(dataset, case_ids, cfg, finish_on_device),
        collate_fn=collate_parts if finish_on_device else None,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=workers > 0,
        worker_init_fn=worker_init_fn,
    )


def training_crops(
    dataset: ShardedDataset | ResidentCases, case_ids: list[str], cfg: Config, finish_on_device: bool
) -> CropDataset:
    """The run's crops as its config draws them, from either source: one definition for both data paths."""
    d = cfg.data
    augmentation = Augmentation(d.rotate_deg, d.scale, d.spatial_prob, d.intensity_aug)
    return CropDataset(
        dataset,
        case_ids,
        d.crop,
        d.samples_per_epoch,
        cfg.train.seed,
        d.foreground_fraction,
        d.flip_axis_indices,
        augmentation,
        finish_on_device,
    )


def padding_note(shapes: dict[str, Sequence[int]], crop: Sequence[int]) -> str | None:
    """One line for the cases smaller than the run's crop, which their crops are padded to (None if there are none):
    normal for small or thin volumes, worth knowing for a crop that does not suit the data."""
    axes = {case: axes_smaller(shape, crop) for case, shape in shapes.items()}
    small = [case for case, along in axes.items() if along]
    if not small:
        return None
    along = ", ".join(axis for axis in "xyz" if any(axis in axes[case] for case in small))
    return (
        f"{len(small)} of {len(shapes)} train cases are smaller than the crop {dims(crop)} along {along} "
        f"({small[0]}: {dims(shapes[small[0]])}); their crops are padded there"
    )
