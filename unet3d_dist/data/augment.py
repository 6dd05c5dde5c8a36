"""Augmentations beyond flips: rotation and scaling of the crop, and nnU-Net-style intensity changes.

Every draw comes from the crop's own generator, so a crop stays a function of (seed, epoch, sample index). When an
augmentation is off it draws nothing, so turning features off reproduces the plain crops exactly. Images are
(C, X, Y, Z): the channels share one spatial transform, and each gets its own intensity draws, all drawn before any
noise (so both augmentation paths draw the same values, and a single-channel crop is what it was before channels
existed).
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


def crop_region(
    shape: list[int], centre: np.ndarray, crop: tuple[int, ...], matrix: np.ndarray
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """The smallest region of the volume that the rotated/scaled crop around ``centre`` reads, and the offset that
    takes crop indices to region coordinates (``region coordinate = matrix @ crop index + offset``); None when the
    crop lies wholly outside the volume."""
    half = (np.asarray(crop) - 1) / 2
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)
    reach = matrix @ corners + centre[:, None]
    low = np.clip(np.floor(reach.min(1)).astype(int) - 1, 0, shape)
    high = np.clip(np.ceil(reach.max(1)).astype(int) + 2, 0, shape)
    if (high <= low).any():
        return None
    return tuple(slice(lo, hi) for lo, hi in zip(low, high)), centre - low - matrix @ half


def padding(pad: list[float], crop: tuple[int, ...]) -> np.ndarray:
    """A (C, *crop) image holding each channel's pad value."""
    return np.broadcast_to(np.asarray(pad, np.float32)[:, None, None, None], (len(pad), *crop)).copy()


def transformed_crop(
    read, shape: list[int], centre: np.ndarray, crop: tuple[int, ...], matrix: np.ndarray, pad: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Resample the rotated/scaled crop around ``centre`` (volume coordinates) from the smallest region that holds it.

    ``read(slices)`` returns (image (C, ...), label) of a region. Image: linear interpolation; label: nearest;
    outside the volume: each channel's ``pad`` and background.
    """
    found = crop_region(shape, centre, crop, matrix)
    if found is None:
        return padding(pad, crop), np.zeros(crop, np.uint8)
    region, offset = found
    image, label = read(region)
    image = np.stack(
        [
            ndimage.affine_transform(channel, matrix, offset, output_shape=crop, order=1, mode="constant", cval=value)
            for channel, value in zip(image, pad)
        ]
    )
    label = ndimage.affine_transform(label, matrix, offset, output_shape=crop, order=0, mode="constant", cval=0)
    return image.astype(np.float32), label


def flipped_affine(matrix: np.ndarray, offset: np.ndarray, axes: tuple[int, ...], crop: tuple[int, ...]):
    """The sampling of a crop that is then flipped along ``axes``, as one affine map: flipping output axis a reads
    index n_a - 1 - p_a, so its column of the matrix changes sign and the offset moves by the column times n_a - 1."""
    matrix, offset = matrix.copy(), offset.copy()
    for axis in axes:
        offset = offset + matrix[:, axis] * (crop[axis] - 1)
        matrix[:, axis] = -matrix[:, axis]
    return matrix, offset


@dataclass(frozen=True)
class IntensityDraw:
    """One crop's intensity changes (nnU-Net's set), drawn from the crop's generator wherever they are applied."""

    brightness: float | None = None
    contrast: float | None = None
    gamma: float | None = None
    noise_sigma: float | None = None


def draw_intensity(rng: np.random.Generator) -> IntensityDraw:
    """nnU-Net's probabilities: brightness 0.15, contrast 0.15, gamma 0.3, noise 0.1."""
    brightness = rng.uniform(0.75, 1.25) if rng.random() < 0.15 else None
    contrast = rng.uniform(0.75, 1.25) if rng.random() < 0.15 else None
    gamma = rng.uniform(0.7, 1.5) if rng.random() < 0.3 else None
    noise_sigma = rng.uniform(0, 0.1) if rng.random() < 0.1 else None
    return IntensityDraw(brightness, contrast, gamma, noise_sigma)


def augment_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The crop's intensity changes, drawn and applied here (the loader workers' way), channel by channel, each on
    its own statistics; noise from the same ``rng``."""
    draws = [draw_intensity(rng) for _ in image]
    return np.stack([_change_channel(channel, draw, rng) for channel, draw in zip(image, draws)])


def _change_channel(image: np.ndarray, draw: IntensityDraw, rng: np.random.Generator) -> np.ndarray:
    if draw.brightness is not None:
        image = image * draw.brightness
    if draw.contrast is not None:
        mean = image.mean()
        image = (image - mean) * draw.contrast + mean
    if draw.gamma is not None:
        low, high = image.min(), image.max()
        span = max(high - low, 1e-6)
        image = ((image - low) / span) ** draw.gamma * span + low
    if draw.noise_sigma is not None:
        image = image + rng.normal(0, draw.noise_sigma, image.shape)
    return image.astype(np.float32)
