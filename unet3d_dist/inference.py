"""Sliding-window prediction over whole volumes with gaussian importance weighting.

Windows overlap by ``overlap`` of the patch, are run in batches, and their logits are weighted by a gaussian
(sigma = patch / 8) before stitching, so window borders, where the network sees least context, count least.
Softmax/argmax is applied once, to the stitched logits, slab by slab along x as the windows pass, so the whole
volume's logits never need to exist (``sliding_window_slabs``). Stitching can live on the GPU or on the CPU, so a
large CT volume only needs one batch of windows on the GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any

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
    """A stop was requested between two window batches (see ``sliding_window_slabs``' ``stop_requested``)."""


def pad_to_patch(image: torch.Tensor, patch: Sequence[int], pad_value: float | Sequence[float]) -> torch.Tensor:
    """``image`` (C, X, Y, Z) grown with ``pad_value`` to at least the patch along every axis, so windows fit."""
    shape = tuple(image.shape[1:])
    padded = [max(s, p) for s, p in zip(shape, patch)]
    if padded == list(shape):
        return image
    values = torch.as_tensor(pad_value, dtype=image.dtype).reshape(-1, 1, 1, 1)
    filled = values.expand(image.shape[0], *padded).clone()
    filled[:, : shape[0], : shape[1], : shape[2]] = image
    return filled


def weighted_windows(
    model: nn.Module,
    image: torch.Tensor,
    patch: tuple[int, int, int],
    corners: list[tuple[int, int, int]],
    options: dict[str, Any],
) -> Iterator[tuple[tuple[int, int, int], torch.Tensor]]:
    """Each window's corner and its gaussian-weighted logits (mean over the flips) on the stitching device, in the
    order of ``corners``; the model runs on batches of them."""
    device, stitch_device, batch_size = options["device"], image.device, options["batch_size"]
    tta_axes, stop_requested = options["tta_axes"], options["stop_requested"]
    # Every combination of flips along the (x, y, z) axes in tta_axes, the identity included.
    flips = [
        tuple(2 + a for a in axes) for n in range(len(tta_axes) + 1) for axes in itertools.combinations(tta_axes, n)
    ]
    window_weight = (gaussian_importance(tuple(patch)) / len(flips)).to(device)  # weight and mean over flips at once
    # When the volume stays on the CPU (large CT), each batch is gathered into pinned memory and copied asynchronously.
    staging = None
    if stitch_device.type == "cpu" and device.type == "cuda":
        staging = torch.empty((batch_size, image.shape[0], *patch), pin_memory=True)
    amp_dtype = options["amp_dtype"]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for first in range(0, len(corners), batch_size):
        if stop_requested is not None and stop_requested():
            raise InferenceStopped
        batch_corners = corners[first : first + batch_size]
        cut = [image[:, x : x + patch[0], y : y + patch[1], z : z + patch[2]] for x, y, z in batch_corners]
        # The last batch's copy from staging is done: its logits came back to the CPU, which waits for the GPU.
        windows = torch.stack(cut, out=staging[: len(cut)]) if staging is not None else torch.stack(cut)
        windows = windows.to(device, non_blocking=True)
        if options["channels_last"]:
            windows = as_channels_last(windows)
        out = None
        with autocast:
            for axes in flips:
                pred = model(windows.flip(axes) if axes else windows)
                pred = (pred.flip(axes) if axes else pred).float()
                out = pred if out is None else out + pred
        # Weighted on the inference device, then moved once; channels-first so the adds read memory in order.
        out = out.contiguous().mul_(window_weight).to(stitch_device)
        yield from zip(batch_corners, out)


@torch.no_grad()
def sliding_window_slabs(
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
) -> Iterator[tuple[int, torch.Tensor]]:
    """Stitched logits of ``image`` (C, X, Y, Z) as ``(x, slab)`` pairs, slab (num_classes, planes, Y, Z) float32 on
    ``stitch_device`` (default: ``device``), in order along x. A slab is only valid until the next is asked for.

    Windows run in order of their x corner, so a plane is final once the windows reach past it. Only the ``patch[0]``
    planes that windows still touch are kept, in a ring, instead of the whole volume times the classes: a 512x512x400
    CT with 118 classes would need 50 GB. Each voxel gets the same additions in the same order as full-volume
    stitching, so the logits are identical. Volumes smaller than the patch are padded with ``pad_value`` (one value,
    or one per channel) and the padding is cut off again. ``tta_axes`` averages the logits over every flip along those
    axes (0, 1, 2 = x, y, z): the ones training mirrored, since a model that never saw left and right swapped would be
    wrong on a left-right mirror. ``stop_requested`` is asked before every window batch, so that a stopping run does
    not wait for a whole large volume; when it says yes, InferenceStopped is raised.
    """
    device = torch.device(device)
    stitch_device = torch.device(stitch_device) if stitch_device is not None else device
    shape = tuple(image.shape[1:])
    image = pad_to_patch(image, patch, pad_value).to(stitch_device)  # cut into windows where it is stitched
    padded = list(image.shape[1:])
    starts = [window_starts(size, side, overlap) for size, side in zip(padded, patch)]
    divisors = [total.to(stitch_device, torch.float32) for total in weight_sums(padded, starts, tuple(patch))]
    ring = torch.zeros((num_classes, patch[0], *padded[1:]), dtype=torch.float32, device=stitch_device)

    def finish(first: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Divide planes [first, stop) by their weight, hand them out, and clear their places for later planes."""
        while first < stop:
            at = first % patch[0]
            end = min(stop, first + patch[0] - at, shape[0] if first < shape[0] else stop)  # padding planes apart
            slab = ring[:, at : at + end - first]
            if first < shape[0]:
                slab /= outer(divisors[0][first:end], divisors[1], divisors[2])
                yield first, slab[:, :, : shape[1], : shape[2]]
            slab.zero_()
            first = end

    options = {"device": device, "batch_size": batch_size, "tta_axes": tta_axes, "amp_dtype": amp_dtype}
    options |= {"channels_last": channels_last, "stop_requested": stop_requested}
    done = 0  # planes before this are handed out
    for (x, y, z), window in weighted_windows(model, image, patch, list(itertools.product(*starts)), options):
        yield from finish(done, x)  # no later window starts before x
        done = max(done, x)
        at, (yy, zz) = x % patch[0], (slice(y, y + patch[1]), slice(z, z + patch[2]))
        ring[:, at:, yy, zz] += window[:, : patch[0] - at]
        ring[:, :at, yy, zz] += window[:, patch[0] - at :]
    yield from finish(done, padded[0])


def sliding_window_logits(
    model: nn.Module, image: torch.Tensor, patch: tuple[int, int, int], num_classes: int, **options: Any
) -> torch.Tensor:
    """The whole volume's logits (num_classes, X, Y, Z) from ``sliding_window_slabs`` (same options), for callers that
    resample them as a whole; it holds the classes times the volume in float32, ``sliding_window_labels`` does not."""
    logits = None
    for x, slab in sliding_window_slabs(model, image, patch, num_classes, **options):
        if logits is None:
            logits = slab.new_empty((num_classes, image.shape[1], *slab.shape[2:]))
        logits[:, x : x + slab.shape[1]] = slab
    return logits


def sliding_window_labels(
    model: nn.Module, image: torch.Tensor, patch: tuple[int, int, int], num_classes: int, **options: Any
) -> np.ndarray:
    """Class map (uint8, X, Y, Z) of ``sliding_window_slabs`` (same options), argmax taken slab by slab, so that
    memory holds ``patch[0]`` planes of logits, not the whole volume's."""
    return labels_from_slabs(tuple(image.shape[1:]), sliding_window_slabs(model, image, patch, num_classes, **options))


def slabs_onto(
    shape: tuple[int, ...],
    model: nn.Module,
    image: torch.Tensor,
    patch: Sequence[int],
    num_classes: int,
    **options: Any,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Logits of ``image`` slab by slab when it lies on the ``shape`` grid; an image on another grid (a member
    trained at another spacing) gives its whole volume's logits, resampled to ``shape``, as one slab."""
    if tuple(image.shape[1:]) == tuple(shape):
        yield from sliding_window_slabs(model, image, patch, num_classes, **options)
        return
    yield 0, resample_to_shape(sliding_window_logits(model, image, patch, num_classes, **options), shape)


def labels_from_slabs(shape: tuple[int, ...], slabs: Iterable[tuple[int, torch.Tensor]]) -> np.ndarray:
    """Class map (uint8) of ``shape`` from ``(x, scores slab)`` pairs covering it along x, in order: each slab's
    argmax. Slabs that leave a gap or stop short are an error, never planes of uninitialised labels."""
    labels = np.empty(shape, np.uint8)
    done = 0
    for x, slab in slabs:
        if x != done:
            raise RuntimeError(f"slab at x={x} does not follow the planes done (0 to {done})")
        labels[x : x + slab.shape[1]] = predict_labels(slab)
        done = x + slab.shape[1]
    if done != shape[0]:
        raise RuntimeError(f"slabs cover x up to {done} of {shape[0]}")
    return labels


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
