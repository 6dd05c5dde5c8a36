"""Sliding-window prediction with a PyTorch network: batches of windows through the model, with flip test-time
augmentation and mixed precision, stitched slab by slab by ``windows.py`` (placement, gaussian weights, the ring of
planes), which the ONNX predictor shares. Stitching can live on the GPU or on the CPU, so a large CT volume only
needs one batch of windows on the GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .model import as_channels_last
from .windows import (
    Corner,
    SlabStitcher,
    flip_sets,
    gaussian_importance,
    labels_from_slabs,
    pad_to_patch,
    stitched_slabs,
    window_grid,
)


def window_runner(
    model: nn.Module, image: torch.Tensor, patch: tuple[int, int, int], options: dict[str, Any]
) -> Callable[[list[Corner]], torch.Tensor]:
    """A function from window corners to their gaussian-weighted logits (mean over the flips) on the stitching
    device: the model runs on the batch of windows cut from ``image``."""
    device, stitch_device = options["device"], image.device
    flips = [tuple(2 + axis for axis in axes) for axes in flip_sets(options["tta_axes"])]
    weight = torch.from_numpy(gaussian_importance(patch)).div_(len(flips)).to(device)  # weight and mean over flips
    # When the volume stays on the CPU (large CT), each batch is gathered into pinned memory and copied asynchronously.
    staging = None
    if stitch_device.type == "cpu" and device.type == "cuda":
        staging = torch.empty((options["batch_size"], image.shape[0], *patch), pin_memory=True)
    amp_dtype = options["amp_dtype"]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def run(corners: list[Corner]) -> torch.Tensor:
        cut = [image[:, x : x + patch[0], y : y + patch[1], z : z + patch[2]] for x, y, z in corners]
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
                del pred
        # Weighted on the inference device, then moved once; channels-first so the adds read memory in order.
        return out.contiguous().mul_(weight).to(stitch_device)

    return run


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

    Memory holds ``patch[0]`` planes of logits, not the volume's (``windows.SlabStitcher``). Volumes smaller than
    the patch are padded with ``pad_value`` (one value, or one per channel) and the padding is cut off again.
    ``tta_axes`` averages the logits over every flip along those axes (0, 1, 2 = x, y, z): the ones training
    mirrored, since a model that never saw left and right swapped would be wrong on a left-right mirror.
    ``stop_requested`` is asked before every window batch, so that a stopping run does
    not wait for a whole large volume; when it says yes, InferenceStopped is raised.
    """
    device = torch.device(device)
    stitch_device = torch.device(stitch_device) if stitch_device is not None else device
    grid = window_grid(image.shape[1:], patch, overlap)
    if grid.padded != grid.shape:
        image = torch.from_numpy(pad_to_patch(image.cpu().numpy(), patch, pad_value))
    image = image.to(stitch_device)  # cut into windows where it is stitched
    ring = torch.zeros((num_classes, patch[0], *grid.padded[1:]), dtype=torch.float32, device=stitch_device)
    divisors = [torch.from_numpy(total).to(stitch_device, torch.float32) for total in grid.divisors]
    options = {"device": device, "batch_size": batch_size, "tta_axes": tta_axes, "amp_dtype": amp_dtype}
    run = window_runner(model, image, tuple(patch), options | {"channels_last": channels_last})
    yield from stitched_slabs(run, grid, SlabStitcher(grid, ring, divisors), batch_size, stop_requested)


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


def resample_to_shape(volume: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A (C, X, Y, Z) volume trilinearly resampled to ``shape`` over the same physical extent."""
    return torch.nn.functional.interpolate(
        volume[None].float(), size=tuple(shape), mode="trilinear", align_corners=False
    )[0]
