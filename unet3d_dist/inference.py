"""Sliding-window prediction over whole volumes with gaussian importance weighting.

Windows overlap by ``overlap`` of the patch, are run in batches, and their logits are weighted by a gaussian
(sigma = patch / 8) before stitching, so window borders, where the network sees least context, count least.
Softmax/argmax is applied once, to the stitched logits. Stitching can live on the GPU or on the CPU, so a large CT
volume only needs one batch of windows on the GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from .model import as_channels_last


def outer(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return x[:, None, None] * y[None, :, None] * z[None, None, :]


@lru_cache(maxsize=8)
def gaussian_axes(patch: tuple[int, int, int], sigma_scale: float = 1 / 8) -> tuple[torch.Tensor, ...]:
    """1-D gaussians (float64, max 1) whose outer product is the window weight; the smallest, at an edge, is e^-8."""
    axes = []
    for size in patch:
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        axis = torch.exp(-0.5 * (coords / (size * sigma_scale)) ** 2)
        axes.append(axis / axis.max())
    return tuple(axes)


@lru_cache(maxsize=8)
def gaussian_importance(patch: tuple[int, int, int]) -> torch.Tensor:
    """Separable gaussian centred on the patch, max 1; even a corner voxel weighs about 4e-11, never 0."""
    return outer(*gaussian_axes(patch)).float()


def weight_sums(shape: list[int], starts: list[list[int]], patch: tuple[int, int, int]) -> list[torch.Tensor]:
    """Per-axis sums of the windows' 1-D weights. The windows form a grid and the weight is separable, so the outer
    product of these sums is the total weight at every voxel, with no full-size add per window."""
    sums = []
    for size, axis_starts, axis in zip(shape, starts, gaussian_axes(patch)):
        total = torch.zeros(size, dtype=torch.float64)
        for start in axis_starts:
            total[start : start + len(axis)] += axis
        sums.append(total)
    return sums


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread window corners covering [0, size) with at least ``overlap`` between neighbours."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    return [round(i * (size - patch) / (count - 1)) for i in range(count)]


class InferenceStopped(Exception):
    """A stop was requested between two window batches (see ``sliding_window_logits``' ``stop_requested``)."""


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    image: torch.Tensor,
    patch: tuple[int, int, int],
    num_classes: int,
    *,
    overlap: float = 0.5,
    batch_size: int = 4,
    pad_value: float | Sequence[float] = 0.0,
    tta_axes: tuple[int, ...] = (),
    amp_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    stitch_device: torch.device | str | None = None,
    channels_last: bool = False,
    stop_requested: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Logits (num_classes, X, Y, Z) for ``image`` (C, X, Y, Z), as float32 on ``stitch_device`` (default: ``device``).

    Volumes smaller than the patch are padded with ``pad_value`` (one value, or one per channel) and the padding is
    cut off again. ``tta_axes`` averages the logits over every flip along those axes (0, 1, 2 = x, y, z): the ones
    training mirrored, since a model that never saw left and right swapped would be wrong on a left-right mirror.
    ``stop_requested`` is asked before every window batch, so that a stopping run does not wait for a whole large
    volume; when it says yes, InferenceStopped is raised.
    """
    device = torch.device(device)
    stitch_device = torch.device(stitch_device) if stitch_device is not None else device
    shape = tuple(image.shape[1:])
    padded = [max(s, p) for s, p in zip(shape, patch)]
    if padded != list(shape):
        values = torch.as_tensor(pad_value, dtype=image.dtype).reshape(-1, 1, 1, 1)
        filled = values.expand(image.shape[0], *padded).clone()
        filled[:, : shape[0], : shape[1], : shape[2]] = image
        image = filled
    # Every combination of flips along the (x, y, z) axes in tta_axes, the identity included.
    flips = [
        tuple(2 + a for a in axes) for n in range(len(tta_axes) + 1) for axes in itertools.combinations(tta_axes, n)
    ]
    window_weight = (gaussian_importance(tuple(patch)) / len(flips)).to(device)  # weight and mean over flips at once
    logits = torch.zeros((num_classes, *padded), dtype=torch.float32, device=stitch_device)
    # The volume goes to the device once, so window batches are cut there. When the logits stay on the CPU (large
    # CT), so does the volume, and each batch is gathered into pinned memory and copied asynchronously.
    image = image.to(stitch_device)
    staging = None
    if image.device.type == "cpu" and device.type == "cuda":
        staging = torch.empty((batch_size, image.shape[0], *patch), pin_memory=True)
    starts = [window_starts(size, side, overlap) for size, side in zip(padded, patch)]
    corners = list(itertools.product(*starts))
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for first in range(0, len(corners), batch_size):
        if stop_requested is not None and stop_requested():
            raise InferenceStopped
        batch_corners = corners[first : first + batch_size]
        cut = [image[:, x : x + patch[0], y : y + patch[1], z : z + patch[2]] for x, y, z in batch_corners]
        # The last batch's copy from staging is done: its logits came back to the CPU, which waits for the GPU.
        windows = torch.stack(cut, out=staging[: len(cut)]) if staging is not None else torch.stack(cut)
        windows = windows.to(device, non_blocking=True)
        if channels_last:
            windows = as_channels_last(windows)
        out = None
        with autocast:
            for axes in flips:
                pred = model(windows.flip(axes) if axes else windows)
                pred = (pred.flip(axes) if axes else pred).float()
                out = pred if out is None else out + pred
        # Weighted on the inference device, then moved once; channels-first so the adds below read memory in order.
        out = out.contiguous().mul_(window_weight).to(stitch_device)
        for (x, y, z), window_logits in zip(batch_corners, out):
            region = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
            logits[(slice(None), *region)] += window_logits
    logits /= outer(*(total.to(stitch_device, torch.float32) for total in weight_sums(padded, starts, tuple(patch))))
    return logits[:, : shape[0], : shape[1], : shape[2]]


def predict_labels(logits: torch.Tensor) -> np.ndarray:
    """Class map (uint8) from stitched logits."""
    return logits.argmax(0).to(torch.uint8).cpu().numpy()


def resample_to_shape(volume: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A (C, X, Y, Z) volume trilinearly resampled to ``shape`` over the same physical extent."""
    return torch.nn.functional.interpolate(
        volume[None].float(), size=tuple(shape), mode="trilinear", align_corners=False
    )[0]


CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected: voxels touching at a corner are one piece


def keep_largest_component(labels: np.ndarray) -> np.ndarray:
    """Per foreground class, drop every connected component (26-connectivity) but the largest."""
    from scipy import ndimage

    out = labels.copy()
    for cls in np.unique(labels):
        if cls == 0:
            continue
        components, count = ndimage.label(labels == cls, structure=CONNECTIVITY)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[(components != np.argmax(sizes)) & (components > 0)] = 0
    return out
