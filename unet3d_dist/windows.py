"""Sliding-window placement, weighting, stitching, ensembling and post-processing, without PyTorch.

The PyTorch segmenter (``inference.py``) and the ONNX predictor (``onnx_prediction.py``) both run their networks
through this module, so a window lands in the same place, weighs the same and is stitched the same way in both.
The stitching functions take arrays of either library (numpy, or torch tensors on any device): they only slice,
add, divide, broadcast and take the argmax, which both spell alike.

Windows overlap by ``overlap`` of the patch and their logits are weighted by a gaussian (sigma = patch / 8), so
window borders, where the network sees least context, count least. Windows run in order of their x corner, so a
plane is final once the windows reach past it: only the ``patch[0]`` planes that windows still touch are kept, in a
ring, and handed on slab by slab (a 512x512x400 CT with 118 classes would need 50 GB stitched whole).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

Corner = tuple[int, int, int]
Slabs = Iterable[tuple[int, Any]]  # (first plane along x, scores slab (classes, planes, Y, Z))


class InferenceStopped(Exception):
    """A stop was requested between two window batches (see ``stitched_slabs``' ``stop_requested``)."""


def outer(x: Any, y: Any, z: Any) -> Any:
    """The (X, Y, Z) outer product of three 1-D arrays."""
    return x[:, None, None] * y[None, :, None] * z[None, None, :]


@lru_cache(maxsize=8)
def gaussian_axes(patch: tuple[int, int, int], sigma_scale: float = 1 / 8) -> tuple[np.ndarray, ...]:
    """1-D gaussians (float64, max 1) whose outer product is the window weight; the smallest, at an edge, is e^-8."""
    axes = []
    for size in patch:
        coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
        axis = np.exp(-0.5 * (coords / (size * sigma_scale)) ** 2)
        axis.flags.writeable = False  # cached: shared by every caller
        axes.append(axis / axis.max())
    return tuple(axes)


def gaussian_importance(patch: tuple[int, int, int]) -> np.ndarray:
    """Separable gaussian centred on the patch (float32), max 1; even a corner voxel weighs about 4e-11, never 0."""
    return outer(*gaussian_axes(tuple(patch))).astype(np.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread window corners covering [0, size) with at least ``overlap`` between neighbours."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    return [round(i * (size - patch) / (count - 1)) for i in range(count)]


def weight_sums(shape: Sequence[int], starts: list[list[int]], patch: tuple[int, int, int]) -> list[np.ndarray]:
    """Per-axis sums of the windows' 1-D weights (float64). The windows form a grid and the weight is separable, so
    the outer product of these sums is the total weight at every voxel, with no full-size add per window."""
    sums = []
    for size, axis_starts, axis in zip(shape, starts, gaussian_axes(tuple(patch))):
        total = np.zeros(size, dtype=np.float64)
        for start in axis_starts:
            total[start : start + len(axis)] += axis
        sums.append(total)
    return sums


def padded_shape(shape: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """The volume grown to at least the patch along every axis, so that windows fit."""
    return tuple(max(s, p) for s, p in zip(shape, patch))


def pad_to_patch(image: np.ndarray, patch: Sequence[int], pad_value: float | Sequence[float]) -> np.ndarray:
    """``image`` (C, X, Y, Z) grown with ``pad_value`` (one value, or one per channel) to ``padded_shape``."""
    shape, padded = image.shape[1:], padded_shape(image.shape[1:], patch)
    if padded == tuple(shape):
        return image
    filled = np.empty((image.shape[0], *padded), image.dtype)
    filled[...] = np.asarray(pad_value, image.dtype).reshape(-1, 1, 1, 1)
    filled[:, : shape[0], : shape[1], : shape[2]] = image
    return filled


def flip_sets(tta_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of flips along the spatial axes in ``tta_axes`` (0, 1, 2 = x, y, z), the identity (an empty
    tuple) first: test-time augmentation averages the logits over all of them."""
    return [axes for n in range(len(tta_axes) + 1) for axes in itertools.combinations(tta_axes, n)]


@dataclass(frozen=True)
class WindowGrid:
    """Where the windows of one (padded) volume go, and the total weight each voxel gets."""

    shape: tuple[int, int, int]  # the volume's own shape, before padding
    padded: tuple[int, int, int]
    patch: tuple[int, int, int]
    corners: list[Corner]  # in order of their x corner, then y, then z
    divisors: list[np.ndarray]  # per-axis weight sums (float64); their outer product is each voxel's weight


def window_grid(shape: Sequence[int], patch: Sequence[int], overlap: float) -> WindowGrid:
    patch, padded = tuple(patch), padded_shape(shape, patch)
    starts = [window_starts(size, side, overlap) for size, side in zip(padded, patch)]
    corners = list(itertools.product(*starts))
    return WindowGrid(tuple(shape), padded, patch, corners, weight_sums(padded, starts, patch))


class SlabStitcher:
    """Adds gaussian-weighted window logits into a ring of ``patch[0]`` planes and hands out each slab of planes,
    divided by its total weight, once no later window touches it. Each voxel gets the same additions in the same
    order as stitching into one whole-volume array, so the logits are identical to that.

    ``ring`` is a zeroed (classes, patch[0], padded Y, padded Z) float array and ``divisors`` the grid's, converted
    to the ring's library and device; a handed-out slab is only valid until the next one is asked for.
    """

    def __init__(self, grid: WindowGrid, ring: Any, divisors: Sequence[Any]):
        self.grid, self.ring, self.divisors = grid, ring, divisors
        self.done = 0  # planes before this are handed out

    def add(self, corner: Corner, window: Any) -> Iterator[tuple[int, Any]]:
        """Add one weighted window (classes, *patch); first hand out the planes before its x (no later window
        starts before it)."""
        x, y, z = corner
        yield from self.finish(x)
        depth = self.grid.patch[0]
        at, yy, zz = x % depth, slice(y, y + self.grid.patch[1]), slice(z, z + self.grid.patch[2])
        self.ring[:, at:, yy, zz] += window[:, : depth - at]
        self.ring[:, :at, yy, zz] += window[:, depth - at :]

    def close(self) -> Iterator[tuple[int, Any]]:
        """Hand out the planes still in the ring."""
        yield from self.finish(self.grid.padded[0])

    def finish(self, stop: int) -> Iterator[tuple[int, Any]]:
        """Divide planes [done, stop) by their weight, hand them out (not the padding), and clear their places."""
        depth, (x_size, y_size, z_size) = self.grid.patch[0], self.grid.shape
        first = self.done
        while first < stop:
            at = first % depth
            end = min(stop, first + depth - at, x_size if first < x_size else stop)  # padding planes apart
            slab = self.ring[:, at : at + end - first]
            if first < x_size:
                slab /= outer(self.divisors[0][first:end], self.divisors[1], self.divisors[2])
                yield first, slab[:, :, :y_size, :z_size]
            slab[...] = 0
            first = end
        self.done = max(self.done, stop)


def stitched_slabs(
    run: Callable[[list[Corner]], Any],
    grid: WindowGrid,
    stitcher: SlabStitcher,
    batch_size: int,
    stop_requested: Callable[[], bool] | None = None,
) -> Iterator[tuple[int, Any]]:
    """The stitched logits as ``(x, slab)`` pairs in order along x. ``run`` gives the weighted logits of a batch of
    windows (batch, classes, *patch); ``stop_requested`` is asked before every batch, and InferenceStopped raised
    when it says yes, so that a stopping run does not wait for a whole large volume."""
    for first in range(0, len(grid.corners), batch_size):
        if stop_requested is not None and stop_requested():
            raise InferenceStopped
        corners = grid.corners[first : first + batch_size]
        weighted = run(corners)
        for corner, window in zip(corners, weighted):
            yield from stitcher.add(corner, window)
        del weighted, window  # the next batch's logits need not meet these in memory
    yield from stitcher.close()


def as_numpy(array: Any) -> np.ndarray:
    """A numpy view or copy of a numpy array or a torch tensor (on any device), without importing torch."""
    return array if isinstance(array, np.ndarray) else array.cpu().numpy()


def labels_from_slabs(shape: Sequence[int], slabs: Slabs) -> np.ndarray:
    """Class map (uint8) of ``shape`` from ``(x, scores slab)`` pairs covering it along x, in order: each slab's
    argmax. Slabs that leave a gap or stop short are an error, never planes of uninitialised labels."""
    labels = np.empty(tuple(shape), np.uint8)
    done = 0
    for x, slab in slabs:
        if x != done:
            raise RuntimeError(f"slab at x={x} does not follow the planes done (0 to {done})")
        labels[x : x + slab.shape[1]] = as_numpy(slab.argmax(0))
        done = x + slab.shape[1]
    if done != shape[0]:
        raise RuntimeError(f"slabs cover x up to {done} of {shape[0]}")
    return labels


def mean_probability_slabs(streams: list[Slabs], softmax: Callable[[Any], Any]) -> Iterator[tuple[int, Any]]:
    """The members' probabilities (``softmax`` over the class axis 0) averaged, as ``(x, slab)`` pairs in order
    along x, from each member's ``(x, logits slab)`` pairs. Slabs of the members are cut differently (their patches
    differ), so each member's probabilities wait until every member reached those planes: memory holds one slab per
    member, not the volume."""
    if not streams:
        raise ValueError("an ensemble needs at least one member")
    members = [iter(stream) for stream in streams]
    pending: list[Any] = [None] * len(members)  # each member's probabilities from plane ``done``
    ends, done = [0] * len(members), 0
    while True:
        for i, member in enumerate(members):
            if ends[i] == done and (item := next(member, None)) is not None:
                x, slab = item  # its planes start at ``done``: the member's earlier ones are all used
                pending[i] = softmax(slab)  # a new array: the slab itself is only valid until the next one
                ends[i] = x + slab.shape[1]
        stop = min(ends)
        if stop == done:
            return
        total = pending[0][:, : stop - done] * 1  # a copy, added into
        for more in pending[1:]:
            total += more[:, : stop - done]
        total /= len(members)
        yield done, total
        pending = [p[:, stop - done :] for p in pending]
        done = stop


def ensemble_labels(shape: Sequence[int], streams: list[Slabs], softmax: Callable[[Any], Any]) -> np.ndarray:
    """The class map of one or more members' ``(x, logits slab)`` streams: one member's argmax (that of its
    probabilities), or the argmax of the members' mean probability."""
    return labels_from_slabs(shape, streams[0] if len(streams) == 1 else mean_probability_slabs(streams, softmax))
