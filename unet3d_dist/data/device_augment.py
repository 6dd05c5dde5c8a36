"""Crops finished on the training device: the loader workers read and draw, the GPU resamples and changes intensity.

A rotated or scaled crop costs a worker about twice the CPU time of a plain one (scipy's resampling of image and
label), and the intensity changes (noise above all) as much again; at GPU step times that starves the GPU. With
``data.augment_device=device`` the workers do only what must stay with them: they read the region the crop needs
and draw every parameter from the crop's own (seed, epoch, index) generator, exactly as on the CPU path. The
training device then resamples the batch (trilinear for the image, nearest for the label, through ``grid_sample``)
and applies the intensity changes. The crops are those of the CPU path up to interpolation rounding (identity and
quarter turns alike), and a run stays reproducible and resumable. Only the noise differs in its values: it comes
from a torch generator seeded by the crop's generator instead of from numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .augment import IntensityDraw, draw_intensity

NO_VALUE = float("nan")  # an intensity change that was not drawn


def draw_for_device(rng: np.random.Generator, channels: int) -> list[tuple[IntensityDraw, int]]:
    """Each channel's intensity changes and the seed of its noise: the changes drawn first, as the CPU path draws
    them, then a seed where the CPU path draws noise."""
    draws = [draw_intensity(rng) for _ in range(channels)]
    return [(draw, int(rng.integers(2**62)) if draw.noise_sigma is not None else 0) for draw in draws]


def crop_parts(
    image: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    affine: tuple[np.ndarray, np.ndarray] | None,
    pad: list[float],
    draws: list[tuple[IntensityDraw, int]] | None,
) -> dict[str, Any]:
    """What a worker (or the resident path) hands on: the crop itself (``affine`` None) or the region to resample it
    from, (C, ...) with the affine map from crop indices to region coordinates, and each channel's intensity changes.

    Image and label are tensors (numpy arrays become tensors, device tensors stay where they are); the rest is small
    metadata kept in numpy on the host, so that finishing the batch reads it without waiting for the device.
    """
    matrix, offset = affine if affine is not None else (np.zeros((3, 3)), np.zeros(3))
    draws = draws or [(IntensityDraw(), 0)] * len(pad)
    values = [[NO_VALUE if v is None else v for v in vars(draw).values()] for draw, _ in draws]
    return {
        "image": as_tensor(image, np.float32),
        "label": as_tensor(label),
        "resample": affine is not None,
        "affine": np.concatenate([matrix, offset[:, None]], 1),
        "pad": np.asarray(pad, np.float32),
        "intensity": np.asarray(values, np.float64),
        "noise_seed": np.asarray([seed for _, seed in draws], np.int64),
    }


def as_tensor(array: np.ndarray | torch.Tensor, dtype: type | None = None) -> torch.Tensor:
    """A contiguous tensor: a tensor stays on its device, a numpy array becomes a CPU tensor of ``dtype``. A view of a
    resident volume is copied, since a reduction (contrast's mean) over a view sums in another order."""
    if isinstance(array, torch.Tensor):
        return array.contiguous()
    return torch.from_numpy(np.ascontiguousarray(array, dtype))


def collate_parts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of crop parts: regions differ in size, so images and labels stay lists; the metadata is stacked."""
    batch = {key: np.stack([item[key] for item in items]) for key in items[0] if key not in ("image", "label")}
    batch["image"] = [item["image"] for item in items]
    batch["label"] = [item["label"] for item in items]
    return batch


def finish_batch(
    batch: dict[str, Any], crop: tuple[int, int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's crops on ``device``: images (N, C, X, Y, Z) float32 and labels (N, X, Y, Z) uint8.

    The host never waits for the device here: it reads only its own numpy metadata, and the affine maps reach the
    device in one non-blocking copy, so the device can still be busy with the previous step.
    """
    affines = to_device(batch["affine"], device)
    images, labels = [], []
    for i, (image, label) in enumerate(zip(batch["image"], batch["label"])):
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        if batch["resample"][i]:
            image, label = resample(image, label, affines[i], crop, batch["pad"][i].tolist())
        changed = [
            change_intensity(channel, values, int(seed))
            for channel, values, seed in zip(image, batch["intensity"][i].tolist(), batch["noise_seed"][i])
        ]
        images.append(torch.stack(changed))
        labels.append(label)
    return torch.stack(images), torch.stack(labels)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without a blocking copy: pinned first on CUDA, then sent asynchronously."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def region_coordinates(affine: torch.Tensor, crop: tuple[int, int, int]) -> torch.Tensor:
    """``matrix @ index + offset`` for every crop index, (X, Y, Z, 3), in float64 so quarter turns hit whole voxels;
    ``affine`` (3, 4) float64 lies on the device already."""
    axes = [torch.arange(n, dtype=torch.float64, device=affine.device) for n in crop]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    return index @ affine[:, :3].T + affine[:, 3]


def resample(
    image: torch.Tensor, label: torch.Tensor, affine: torch.Tensor, crop: tuple[int, int, int], pad: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop from its region: trilinear for the image (C, ...), nearest for the label; a point outside the region
    (which ends where the volume does) is each channel's ``pad`` and background, as in scipy's constant mode on the
    workers. The region's sizes and the pad values enter as Python numbers, so no host value is copied here."""
    coords = region_coordinates(affine, crop)
    outside = (coords < -1e-6).any(-1)
    for axis, size in enumerate(label.shape):
        outside |= coords[..., axis] > size - 1 + 1e-6
    scaled = [2 * coords[..., axis] / max(size - 1, 1) - 1 for axis, size in enumerate(label.shape)]
    grid = torch.stack(scaled, -1).flip(-1)[None]  # grid_sample's (z, y, x), align_corners
    dtype = torch.float64 if image.device.type == "cpu" else torch.float32  # the GPU samples in float32
    out = F.grid_sample(image.to(dtype)[None], grid.to(dtype), mode="bilinear", align_corners=True)[0]
    nearest = F.grid_sample(label.to(dtype)[None, None], grid.to(dtype), mode="nearest", align_corners=True)[0, 0]
    image = torch.stack([torch.where(outside, value, channel) for channel, value in zip(out, pad)]).float()
    return image, torch.where(outside, 0, nearest.round()).to(torch.uint8)


def change_intensity(image: torch.Tensor, values: list[float], noise_seed: int) -> torch.Tensor:
    """The worker's drawn intensity changes (brightness, contrast, gamma, noise sigma), in the CPU path's order."""
    brightness, contrast, gamma, sigma = values
    if not np.isnan(brightness):
        image = image * brightness
    if not np.isnan(contrast):
        mean = image.mean()
        image = (image - mean) * contrast + mean
    if not np.isnan(gamma):
        low, high = image.min(), image.max()
        span = (high - low).clamp(min=1e-6)
        image = ((image - low) / span) ** gamma * span + low
    if not np.isnan(sigma):
        generator = torch.Generator(image.device).manual_seed(noise_seed)
        image = image + torch.randn(image.shape, generator=generator, device=image.device) * sigma
    return image.float()
