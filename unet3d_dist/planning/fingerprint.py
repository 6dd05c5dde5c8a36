"""A data set's fingerprint: what planning needs to know about its scans, computed once per case and pooled.

Per case: spacing, shape, orientation, every class's voxel count and the share of it in its largest connected
piece, and each channel's intensity percentiles over the whole scan and over its labelled voxels (sampled, as
nnU-Net does, so that a large scan costs no more than a small one). Pooled: medians and ranges of spacings and
shapes, the orientations seen, per-channel foreground percentiles, mean and std over all cases' samples, and per
class its median volume, the share of cases holding it and how whole it is (the 10th percentile of that share).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..components import largest_piece_shares

PERCENTILES = (0.5, 50.0, 99.5)
SAMPLES_PER_CASE = 10_000  # foreground intensities kept per case and channel for the pooled statistics


def case_fingerprint(
    channels: list[np.ndarray],
    label: np.ndarray,
    spacing: tuple[float, ...],
    orientation: str,
    num_classes: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One case's entry: ``channels`` are (x, y, z) intensity arrays, ``label`` holds class indices."""
    foreground = label > 0
    entry: dict[str, Any] = {
        "spacing": [float(s) for s in spacing],
        "shape": list(label.shape),
        "orientation": orientation,
        "class_voxels": [int(v) for v in np.bincount(label.ravel(), minlength=num_classes)[:num_classes]],
        "largest_piece_share": largest_piece_shares(label, num_classes),
        "channels": [],
    }
    for image in channels:
        values = image[foreground]
        sample = rng.choice(values, min(SAMPLES_PER_CASE, values.size), replace=False) if values.size else values
        entry["channels"].append(
            {
                "whole": [float(v) for v in np.percentile(image, PERCENTILES)],
                "background_is_zero": float((image == 0).mean()),  # a masked background (skull-stripped MRI)
                "foreground_sample": sample.astype(np.float32),
            }
        )
    return entry


def pool(cases: dict[str, dict[str, Any]], classes: list[str], channel_names: list[str]) -> dict[str, Any]:
    """The data set's fingerprint from its cases' entries (their foreground samples are pooled, not kept)."""
    spacings = np.array([c["spacing"] for c in cases.values()])
    shapes = np.array([c["shape"] for c in cases.values()])
    counts = np.array([c["class_voxels"] for c in cases.values()])
    volumes_ml = counts * (np.prod(spacings, axis=1) / 1000.0)[:, None]
    return {
        "cases": len(cases),
        "spacing": {
            "median": np.median(spacings, axis=0).tolist(),
            "p10": np.percentile(spacings, 10, axis=0).tolist(),
            "min": spacings.min(axis=0).tolist(),
            "max": spacings.max(axis=0).tolist(),
        },
        "shape": {
            "median": np.median(shapes, axis=0).tolist(),
            "min": shapes.min(axis=0).tolist(),
            "max": shapes.max(axis=0).tolist(),
        },
        "extent_mm_median": np.median(shapes * spacings, axis=0).tolist(),
        "orientations": sorted({c["orientation"] for c in cases.values()}),
        "channels": {name: _channel(cases, index) for index, name in enumerate(channel_names)},
        "classes": {
            name: _class(counts[:, k], volumes_ml[:, k], [c["largest_piece_share"][k - 1] for c in cases.values()])
            for k, name in enumerate(classes)
            if k
        },
        "per_case": {
            case_id: {key: value for key, value in c.items() if key != "channels"}
            | {"whole_percentiles": [channel["whole"] for channel in c["channels"]]}
            for case_id, c in cases.items()
        },
    }


def _channel(cases: dict[str, dict[str, Any]], index: int) -> dict[str, Any]:
    entries = [c["channels"][index] for c in cases.values()]
    pooled = np.concatenate([e["foreground_sample"] for e in entries])
    found = pooled.size > 0
    return {
        "foreground_percentiles": dict(
            zip(map(str, PERCENTILES), np.percentile(pooled, PERCENTILES).tolist() if found else [math.nan] * 3)
        ),
        "foreground_mean": float(pooled.mean()) if found else math.nan,
        "foreground_std": float(pooled.std()) if found else math.nan,
        "whole_percentiles": dict(
            zip(map(str, PERCENTILES), np.median([e["whole"] for e in entries], axis=0).tolist())
        ),
        "zero_share": float(np.median([e["background_is_zero"] for e in entries])),
    }


def _class(voxels: np.ndarray, volumes_ml: np.ndarray, piece_shares: list[float | None]) -> dict[str, float]:
    held = voxels > 0
    shares = [share for share in piece_shares if share is not None]
    return {
        "median_volume_ml": float(np.median(volumes_ml[held])) if held.any() else 0.0,
        "median_voxels": float(np.median(voxels[held])) if held.any() else 0.0,
        "share_of_cases": float(held.mean()),
        "largest_piece_share_p10": float(np.percentile(shares, 10)) if shares else math.nan,
    }
