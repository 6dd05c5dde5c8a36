"""Intensity normalisation shared by dataset preparation, the synthetic phantom and prediction.

The spec is stored in the dataset manifest (and so in every checkpoint), so new scans at prediction time get
exactly the normalisation the training data had.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def ct_window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip HU to [low, high] and map that window linearly onto [-1, 1]."""
    centre, half = (high + low) / 2, (high - low) / 2
    return ((np.clip(hu, low, high) - centre) / half).astype(np.float32)


def zscore(image: np.ndarray, nonzero: bool = False) -> np.ndarray:
    """Per-volume z-score; with ``nonzero`` the statistics come from (and apply to) voxels != 0 only."""
    image = image.astype(np.float32)
    mask = image != 0 if nonzero else np.ones(image.shape, bool)
    values = image[mask]
    if values.size == 0:
        return np.zeros_like(image)
    out = (image - values.mean()) / max(float(values.std()), 1e-8)
    if nonzero:
        out[~mask] = 0
    return out.astype(np.float32)


def normalize(image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Apply a manifest's ``normalization`` spec: {"kind": "ct_window", "window": [lo, hi]}, {"kind": "zscore", ...} or {"kind": "none"}."""
    kind = spec.get("kind")
    if kind == "ct_window":
        low, high = spec["window"]
        return ct_window(image, low, high)
    if kind == "zscore":
        return zscore(image, spec.get("nonzero", False))
    if kind == "none":
        return image.astype(np.float32)
    raise ValueError(f"unknown normalization kind {kind!r}; expected ct_window, zscore or none")
