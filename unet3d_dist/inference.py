"""Sliding-window prediction over whole volumes with gaussian importance weighting.

Windows overlap by ``overlap`` of the patch, are run in batches, and their logits are weighted by a gaussian
(sigma = patch / 8) before stitching, so window borders, where the network sees least context, count least.
Softmax/argmax is applied once, to the stitched logits. Stitching can live on the GPU or on the CPU, so a large CT
volume only needs one batch of windows on the GPU.
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import numpy as np
import torch
from torch import nn


@lru_cache(maxsize=8)
def gaussian_importance(patch: tuple[int, int, int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """Separable gaussian centred on the patch, normalised to max 1, with a floor so no voxel weighs zero."""
    axes = []
    for size in patch:
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        axes.append(torch.exp(-0.5 * (coords / (size * sigma_scale)) ** 2))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weight = weight / weight.max()
    return weight.clamp_min(weight[weight > 0].min().item()).float()


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread window corners covering [0, size) with at least ``overlap`` between neighbours."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    return [round(i * (size - patch) / (count - 1)) for i in range(count)]


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    image: torch.Tensor,
    patch: tuple[int, int, int],
    num_classes: int,
    *,
    overlap: float = 0.5,
    batch_size: int = 4,
    pad_value: float = 0.0,
    tta_flips: bool = False,
    amp_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    stitch_device: torch.device | str | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Logits (num_classes, X, Y, Z) for ``image`` (C, X, Y, Z), as float32 on ``stitch_device`` (default: ``device``).

    Volumes smaller than the patch are padded with ``pad_value`` and the padding is cut off again.
    """
    device = torch.device(device)
    stitch_device = torch.device(stitch_device) if stitch_device is not None else device
    shape = tuple(image.shape[1:])
    padded = [max(s, p) for s, p in zip(shape, patch)]
    if padded != list(shape):
        pad = [(0, p - s) for s, p in zip(shape, padded)]
        image = torch.nn.functional.pad(image, [v for pair in reversed(pad) for v in pair], value=pad_value)
    weight = gaussian_importance(tuple(patch)).to(stitch_device)
    flips = [()] + ([(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if tta_flips else [])
    window_weight = (weight / len(flips)).to(device)  # weighting and the mean over flips in one multiply
    logits = torch.zeros((num_classes, *padded), dtype=torch.float32, device=stitch_device)
    norm = torch.zeros(padded, dtype=torch.float32, device=stitch_device)
    corners = [
        (x, y, z)
        for x in window_starts(padded[0], patch[0], overlap)
        for y in window_starts(padded[1], patch[1], overlap)
        for z in window_starts(padded[2], patch[2], overlap)
    ]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for first in range(0, len(corners), batch_size):
        batch_corners = corners[first : first + batch_size]
        windows = torch.stack(
            [image[:, x : x + patch[0], y : y + patch[1], z : z + patch[2]] for x, y, z in batch_corners]
        ).to(device, non_blocking=True)
        if channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last_3d)
        out = None
        with autocast:
            for axes in flips:
                pred = model(windows.flip(axes) if axes else windows)
                pred = (pred.flip(axes) if axes else pred).float()
                out = pred if out is None else out + pred
        # Weighted on the inference device, then moved once; channels-first so the adds below read memory in order.
        out = (out.contiguous() * window_weight).to(stitch_device)
        for (x, y, z), window_logits in zip(batch_corners, out):
            region = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
            logits[(slice(None), *region)] += window_logits
            norm[region] += weight
    logits /= norm
    return logits[:, : shape[0], : shape[1], : shape[2]]


def predict_labels(logits: torch.Tensor) -> np.ndarray:
    """Class map (uint8) from stitched logits."""
    return logits.argmax(0).to(torch.uint8).cpu().numpy()
