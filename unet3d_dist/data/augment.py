"""Augmentations beyond flips: rotation and scaling of the crop, and nnU-Net-style intensity changes.

Every draw comes from the crop's own generator, so a crop stays a function of (seed, epoch, sample index). When an
augmentation is off it draws nothing, so turning features off reproduces the plain crops exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Augmentation:
    rotate_deg: float = 0.0  # largest rotation about each axis
    scale: float = 0.0  # largest relative zoom: 0.15 draws from [0.85, 1.15]
    spatial_prob: float = 0.3  # share of crops that are rotated and scaled (when either is on)
    intensity: bool = False  # brightness, contrast, gamma and noise

    @property
    def spatial(self) -> bool:
        return self.rotate_deg > 0 or self.scale > 0


def rotation(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def spatial_matrix(rng: np.random.Generator, aug: Augmentation) -> np.ndarray | None:
    """Matrix taking crop offsets (from its centre) to volume offsets, or None for an untransformed crop."""
    if not aug.spatial or rng.random() >= aug.spatial_prob:
        return None
    angles = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg, 3))
    zoom = rng.uniform(1 - aug.scale, 1 + aug.scale)
    return rotation(angles) / zoom


def transformed_crop(
    read, shape: list[int], centre: np.ndarray, crop: tuple[int, ...], matrix: np.ndarray, pad: float
) -> tuple[np.ndarray, np.ndarray]:
    """Resample the rotated/scaled crop around ``centre`` (volume coordinates) from the smallest region that holds it.

    ``read(slices)`` returns (image, label) of a region. Image: linear interpolation; label: nearest; outside the
    volume: ``pad`` and background.
    """
    half = (np.asarray(crop) - 1) / 2
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)
    reach = matrix @ corners + centre[:, None]
    low = np.clip(np.floor(reach.min(1)).astype(int) - 1, 0, shape)
    high = np.clip(np.ceil(reach.max(1)).astype(int) + 2, 0, shape)
    if (high <= low).any():
        return np.full(crop, pad, np.float32), np.zeros(crop, np.uint8)
    image, label = read(tuple(slice(lo, hi) for lo, hi in zip(low, high)))
    offset = centre - low - matrix @ half
    image = ndimage.affine_transform(image, matrix, offset, output_shape=crop, order=1, mode="constant", cval=pad)
    label = ndimage.affine_transform(label, matrix, offset, output_shape=crop, order=0, mode="constant", cval=0)
    return image.astype(np.float32), label


def augment_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """nnU-Net's intensity set with its probabilities: brightness 0.15, contrast 0.15, gamma 0.3, noise 0.1."""
    if rng.random() < 0.15:
        image = image * rng.uniform(0.75, 1.25)
    if rng.random() < 0.15:
        mean = image.mean()
        image = (image - mean) * rng.uniform(0.75, 1.25) + mean
    if rng.random() < 0.3:
        low, high = image.min(), image.max()
        span = max(high - low, 1e-6)
        image = ((image - low) / span) ** rng.uniform(0.7, 1.5) * span + low
    if rng.random() < 0.1:
        image = image + rng.normal(0, rng.uniform(0, 0.1), image.shape)
    return image.astype(np.float32)
