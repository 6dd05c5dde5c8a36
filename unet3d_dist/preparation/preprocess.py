"""Transforms shared by dataset preparation, the synthetic phantom and prediction.

The dataset manifest's ``preprocessing`` dict (stored in every checkpoint) names them all, so new scans at prediction
time go through exactly what the training data went through: reorientation, resampling and intensity normalisation
(``model_input``). Label mapping and cropping only apply to prepared training data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from ..data.shards import channel_names
from ..optional import sitk
from .readers import CaseError

Interpolation = Literal["linear", "cubic"]
INTERPOLATORS = {"linear": "sitkLinear", "cubic": "sitkBSpline"}  # SimpleITK's name of each Interpolation, read on use
CANONICAL_ORIENTATION = "LPS"  # identity direction; the synthetic phantom is built in it
NORMALIZATIONS = ("ct_window", "zscore", "none")
INTENSITY_PERCENTILES = (0.5, 99.5)  # what the manifest's intensity_range pools and predict compares


def intensity_percentiles(voxels: np.ndarray) -> list[float]:
    """The 0.5 and 99.5 percentiles of one channel's raw intensities over the whole volume: predict has neither a
    label nor (for MRI) a body threshold, so prepare measures the same whole scan that predict will compare."""
    return [float(v) for v in np.percentile(voxels, INTENSITY_PERCENTILES)]


def ct_window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip HU to [low, high] and map that window linearly onto [-1, 1]."""
    centre, half = (high + low) / 2, (high - low) / 2
    return ((np.clip(hu, low, high) - centre) / half).astype(np.float32)


def zscore(image: np.ndarray, nonzero: bool = False) -> np.ndarray:
    """Per-volume z-score; with ``nonzero`` the statistics come from (and apply to) voxels != 0 only."""
    image = image.astype(np.float32)
    values = image[image != 0] if nonzero else image
    if values.size == 0:
        return np.zeros_like(image)
    out = (image - values.mean()) / max(float(values.std()), 1e-8)
    if nonzero:
        out[image == 0] = 0
    return out.astype(np.float32)


def check_normalization(spec: Any, key: str = "normalization") -> None:
    """Raise ValueError (naming ``key``) unless ``spec`` is a valid ``normalization`` entry: one spec, or {channel
    name: spec}."""
    if isinstance(spec, dict) and spec and "kind" not in spec and all(isinstance(v, dict) for v in spec.values()):
        for name, one in spec.items():
            check_normalization(one, f"{key}.{name}")
        return
    if not isinstance(spec, dict) or spec.get("kind") not in NORMALIZATIONS:
        raise ValueError(f"{key} must be a mapping with kind {', '.join(NORMALIZATIONS)}, not {spec!r}")
    if spec["kind"] == "ct_window":
        window = spec.get("window")
        if not (isinstance(window, list) and len(window) == 2 and window[0] < window[1]):
            raise ValueError(f"{key}.window must be [low, high] in HU with low < high, not {window!r}")


def channel_normalization(spec: dict[str, Any], channel: str) -> dict[str, Any]:
    """The normalization of one channel: the spec itself, or its entry for ``channel``."""
    if "kind" in spec:
        return spec
    if channel not in spec:
        raise ValueError(f"normalization has no entry for channel {channel!r}; it names {', '.join(spec)}")
    return spec[channel]


def normalize(image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Apply a manifest's ``normalization`` spec: {"kind": "ct_window", "window": [lo, hi]}, {"kind": "zscore", ...} or
    {"kind": "none"}.
    """
    kind = spec.get("kind")
    if kind == "ct_window":
        low, high = spec["window"]
        return ct_window(image, low, high)
    if kind == "zscore":
        return zscore(image, spec.get("nonzero", False))
    if kind == "none":
        return image.astype(np.float32)
    raise ValueError(f"unknown normalization kind {kind!r}; expected ct_window, zscore or none")


def reorient(image: sitk.Image, orientation: str | None) -> sitk.Image:
    """Permute and flip axes (no interpolation) to ``orientation``; None keeps the stored axes."""
    return image if orientation is None else sitk.DICOMOrient(image, orientation)


def resample(image: sitk.Image, spacing: list[float] | None, interpolation: str, default: float) -> sitk.Image:
    """Resample to ``spacing`` with the same origin, direction and physical extent; None or equal spacing is a no-op."""
    if spacing is None or np.allclose(image.GetSpacing(), spacing, rtol=1e-6):
        return image
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        getattr(sitk, INTERPOLATORS[interpolation]),
        image.GetOrigin(),
        [float(s) for s in spacing],
        image.GetDirection(),
        float(default),
        sitk.sitkFloat32,
    )


def onto_grid(label: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A label map moved onto ``reference``'s grid by nearest neighbour (background outside), as uint8."""
    same = label.GetSize() == reference.GetSize() and all(
        np.allclose(getattr(label, f"Get{key}")(), getattr(reference, f"Get{key}")(), rtol=0, atol=1e-6)
        for key in ("Spacing", "Origin", "Direction")
    )
    if same:  # already there: skip the resampler's pass over every voxel
        return sitk.Cast(label, sitk.sitkUInt8)
    return sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def model_input(channels: list[sitk.Image], preprocessing: dict[str, Any]) -> list[sitk.Image]:
    """Each channel reoriented, resampled and normalised on its own (float32), on the grid the network sees;
    cut-off edges get the channel's minimum.

    ``channels`` are the images in ``channel_names(preprocessing)`` order, on one grid. A dataset that records no
    orientation (the synthetic phantom) is LPS by construction.
    """
    out = []
    for name, image in zip(channel_names(preprocessing), channels, strict=True):
        image = reorient(image, preprocessing.get("orientation", CANONICAL_ORIENTATION))
        lowest = float(sitk.GetArrayViewFromImage(image).min())
        image = resample(image, preprocessing.get("spacing"), preprocessing.get("interpolation", "linear"), lowest)
        spec = channel_normalization(preprocessing["normalization"], name)
        normalized = sitk.GetImageFromArray(normalize(sitk.GetArrayFromImage(image), spec))
        normalized.CopyInformation(image)
        out.append(normalized)
    return out


def map_labels(label: np.ndarray, classes: dict[str, list[int]], unmapped: str, where: object) -> np.ndarray:
    """Source label values to class indices (the order of ``classes``); several values may merge into one class.

    Values no class lists become background when ``unmapped`` is "background" and raise CaseError when it is "error".
    """
    values = np.unique(label)
    if not np.array_equal(values, np.round(values)):
        raise CaseError(f"label {where} holds non-integer values such as {values[values != np.round(values)][0]}")
    table = {int(v): index for index, class_values in enumerate(classes.values()) for v in class_values}
    strays = [int(v) for v in values if int(v) not in table]
    if strays and unmapped == "error":
        shown = ", ".join(map(str, strays[:10])) + (" ..." if len(strays) > 10 else "")
        raise CaseError(
            f"label {where} holds values {shown} that labels.classes does not map "
            "(list them under a class, or set labels.unmapped: background)"
        )
    lookup = np.zeros(int(values.max()) - int(values.min()) + 1, np.uint8)
    for value, index in table.items():
        if values.min() <= value <= values.max():
            lookup[value - int(values.min())] = index
    return lookup[label.astype(np.int64) - int(values.min())]


def dims(shape: Sequence[int]) -> str:
    """``(31, 25, 28)`` -> ``31x25x28``, the way sizes are written on the command line."""
    return "x".join(map(str, shape))


def axes_smaller(shape: Sequence[int], size: Sequence[int]) -> str:
    """The axes along which ``shape`` is smaller than ``size`` (``'y, z'``), or ``''``: crops and sliding windows of
    ``size`` are padded along them."""
    return ", ".join(axis for axis, have, need in zip("xyz", shape, size) if have < need)


def bounding_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[slice, ...] | None:
    """Slices around the True voxels of ``mask`` widened by ``margin_mm`` (whole voxels of ``spacing``) per axis;
    None if nothing is True."""
    if not mask.any():
        return None
    box = []
    for axis, extra in enumerate(math.ceil(margin_mm / s) for s in spacing):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(hits[0]) - extra), min(mask.shape[axis], int(hits[-1]) + 1 + extra)))
    return tuple(box)


def padding_line(path: object, prepared: sitk.Image, patch: tuple[int, int, int]) -> str | None:
    """The line that tells the user an input is smaller than the patch, so the sliding window pads it."""
    axes = axes_smaller(prepared.GetSize(), patch)
    if not axes:
        return None
    return (
        f"{path}: prepared shape {dims(prepared.GetSize())} is smaller than the patch {dims(patch)} along {axes}, so "
        "it is padded there"
    )


def intensity_line(
    path: object, channels: list[sitk.Image], names: list[str], trained_range: dict[str, list[float]] | None
) -> str | None:
    """A warning for a scan unlike the training data (another modality, units or scaling): a channel's 0.5 or 99.5
    percentile beyond the training range (``trained_range``, per channel name) by more than the range's width. None
    without a recorded range."""
    if not trained_range:
        return None
    far = []
    for name, image in zip(names, channels):
        (low, high), (trained_low, trained_high) = (
            intensity_percentiles(sitk.GetArrayViewFromImage(image)),
            trained_range[name],
        )
        width = trained_high - trained_low
        if low < trained_low - width or high > trained_high + width:
            far.append(f"{name} {low:g} to {high:g} against {trained_low:g} to {trained_high:g}")
    if not far:
        return None
    return (
        f"warning: {path} has intensities far outside the training data's (0.5 to 99.5 percentile: {'; '.join(far)}), "
        "so its mask may be meaningless"
    )
