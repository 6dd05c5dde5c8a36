"""Synthetic abdominal CT phantom: the embedded default dataset.

Each volume is built from tissue masks in millimetres, so the liver label is exact by construction; the image is
painted from those masks with portal-venous-phase HU values, partial-volume blur, a smooth bias field and noise
(sigma 10-22 HU). The liver is an irregular, randomly deformed and placed shape with brighter vessels; the spleen
is 15-35 HU brighter and lies on the other side, parted from the liver by fat, so the network has to use shape and
position as well as intensity.

By default (``data.synthetic_channels: 2``) each volume also has an arterial phase of the same anatomy, as a second
channel: there the liver is still dim (60-80 HU) and the spleen and kidney cortex bright, so the pair tells liver
from spleen where the portal phase alone may not (in one of the 4 test phantoms a single-phase model takes the
spleen for liver). The first channel is the single-channel phantom itself (``data.synthetic_channels: 1``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from ..components import largest_component
from ..preparation.preprocess import ct_window, intensity_percentiles
from .shards import MANIFEST, Case, channels_first, write_dataset

# Names the cache folder. v4: chunk checksums; v5: the liver label stops at the spine, which v4 painted over up to
# 5 % of some livers (labelled liver, looking like bone), and a fat plane parts the spleen from the liver, which it
# touched in some cases (the same HU on both sides of a one-voxel seam); v6: the same voxels, with the intensity
# range in the manifest and the class and channel names in each shard, which a v5 cache lacks; v7: the same voxels,
# with each case's largest-piece share and the manifest's largest_component advice.
GENERATOR_VERSION = 7
DATA_SEED = 20240601
SPACING_MM = 3.0
HU_WINDOW = (-200.0, 250.0)
CLASSES = ["background", "liver"]
PHASES = ("portal_venous", "arterial")  # the channels of the two-channel phantom


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 6) -> np.ndarray:
    """Unit-variance noise that varies over roughly 1/coarse of the volume (cubic to 1/4 size, then linear: fast)."""
    field = rng.standard_normal((coarse, coarse, coarse))
    quarter = [max(coarse, s // 4) for s in shape]
    field = ndimage.zoom(field, [q / coarse for q in quarter], order=3, mode="reflect")
    field = ndimage.zoom(field, [s / q for s, q in zip(shape, field.shape)], order=1)[
        : shape[0], : shape[1], : shape[2]
    ]
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii, rotation_deg: float = 0.0) -> np.ndarray:
    """Normalised ellipsoid distance (1 on the surface), rotated about z."""
    x, y, z = (g - c for g, c in zip(grid, centre))
    t = np.deg2rad(rotation_deg)
    xr, yr = np.cos(t) * x + np.sin(t) * y, -np.sin(t) * x + np.cos(t) * y
    return np.sqrt((xr / radii[0]) ** 2 + (yr / radii[1]) ** 2 + (z / radii[2]) ** 2)


class _Torso(NamedTuple):
    """The frame the organs are placed in: its HU so far and the masks that the organs avoid and the bones cover."""

    hu: np.ndarray
    cavity: np.ndarray
    vertebra: np.ndarray
    cortex: np.ndarray  # the vertebra's rim
    canal: np.ndarray
    spine: np.ndarray  # vertebra and canal: no organ reaches into it
    rib_band: np.ndarray  # where ribs may be; their spacing is drawn after the organs', so they are not made here


def _torso(rng: np.random.Generator, grid: tuple[np.ndarray, ...], shape: tuple[int, ...], half_z: float) -> _Torso:
    """Body wall, abdominal cavity with bowel and gas, and lungs, painted in HU; the spine and rib masks only, since
    the bones are painted over the organs, which are drawn next."""
    x, y, z = grid
    # Body: elliptical cylinder, slightly varying along z. x is patient left-right, y anterior(-)/posterior(+).
    body_a = rng.uniform(150, 180) * (1 + 0.05 * np.sin(z / 60))
    body_b = rng.uniform(100, 125) * (1 + 0.04 * np.cos(z / 50))
    body_r = np.sqrt((x / body_a) ** 2 + (y / body_b) ** 2)
    body = body_r < 1
    fat_depth = rng.uniform(0.08, 0.16)
    muscle_wall = (body_r < 1 - fat_depth) & (body_r >= 1 - fat_depth - 0.07)
    cavity = body_r < 1 - fat_depth - 0.07

    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = -100  # subcutaneous fat
    hu[muscle_wall] = 50
    # Abdominal cavity: mixed visceral fat and bowel loops.
    bowel = (_smooth_noise(rng, shape, 10) > 0.2) & cavity
    hu[cavity] = -90
    hu[bowel] = rng.uniform(20, 45)
    gas = (_smooth_noise(rng, shape, 14) > 1.9) & bowel
    hu[gas] = -850

    # Lungs fill the top of the volume (superior z), posterior-lateral.
    lung_floor = half_z - rng.uniform(0.15, 0.3) * 2 * half_z
    for side in (-1, 1):
        lung = _ellipsoid(grid, (side * 80, 15, half_z + 30), (65, 75, half_z + 30 - lung_floor + 40)) < 1
        hu[lung & cavity] = -850

    # Spine (vertebral body and canal) and the band of the ribs.
    spine_y = body_b * 0.72
    centre_distance = np.sqrt(x**2 + (y - spine_y) ** 2)
    vertebra = (centre_distance < 22) & body
    canal = np.sqrt(x**2 + (y - spine_y - 30) ** 2) < 8
    rib_band = (body_r > 1 - fat_depth - 0.07) & (body_r < 1 - fat_depth - 0.02) & (z > -0.2 * half_z)
    return _Torso(
        hu=hu,
        cavity=cavity,
        vertebra=vertebra,
        cortex=vertebra & (centre_distance > 18),
        canal=canal,
        spine=vertebra | canal,
        rib_band=rib_band & (y > -0.5 * body_b),
    )


def _organs(
    rng: np.random.Generator, grid: tuple[np.ndarray, ...], shape: tuple[int, ...], half_z: float, torso: _Torso
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Liver, spleen and kidneys: the liver and the neighbours whose intensity overlaps its own."""
    # Liver: deformed union of a right lobe and a smaller left lobe, under the right lung.
    centre = (rng.uniform(-85, -55), rng.uniform(-15, 15), rng.uniform(0.15, 0.4) * half_z)
    radii = (rng.uniform(70, 90), rng.uniform(60, 80), rng.uniform(55, 75))
    right = _ellipsoid(grid, centre, radii, rng.uniform(-20, 20))
    left_centre = (centre[0] + rng.uniform(60, 90), centre[1] - rng.uniform(15, 35), centre[2] + rng.uniform(0, 20))
    left = _ellipsoid(grid, left_centre, (rng.uniform(35, 55), rng.uniform(25, 40), rng.uniform(30, 45)))
    distance = np.minimum(right, left) + 0.22 * _smooth_noise(rng, shape, 5) + 0.06 * _smooth_noise(rng, shape, 12)
    liver = largest_component((distance < 1) & torso.cavity & ~torso.spine, connectivity=6)  # one organ: no islands

    # Neighbours with overlapping intensity.
    spleen = (
        (
            _ellipsoid(grid, (rng.uniform(70, 100), rng.uniform(20, 50), centre[2]), (35, 28, 50), rng.uniform(-30, 30))
            + 0.15 * _smooth_noise(rng, shape, 8)
            < 1
        )
        & torso.cavity
        & ~ndimage.binary_dilation(liver, iterations=2)  # organs are wrapped in fat: a plane ~2 voxels thick
    )
    kidneys = np.zeros(shape, bool)
    for side in (-1, 1):
        kidneys |= (
            _ellipsoid(
                grid,
                (side * rng.uniform(55, 75), rng.uniform(35, 55), rng.uniform(-0.3, 0.1) * half_z),
                (28, 22, 50),
                side * 20,
            )
            < 1
        )
    kidneys &= torso.cavity & ~liver
    return liver, spleen, kidneys


def make_phantom(
    rng: np.random.Generator, shape: tuple[int, int, int], phases: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """One abdominal CT volume in HU (float32) and its liver label (uint8), both (x, y, z) at SPACING_MM; with
    ``phases=2`` the HU are (2, x, y, z), portal-venous then arterial (its draws come after all of the first's).

    The random draws are made in a fixed order (torso, organs, their HU, ribs, scanner, arterial phase): changing it
    changes every phantom, and the cached datasets' GENERATOR_VERSION must then change too."""
    axes = [(np.arange(n) - (n - 1) / 2) * SPACING_MM for n in shape]
    grid = tuple(np.meshgrid(*axes, indexing="ij", sparse=True))
    half_z = axes[2][-1]
    torso = _torso(rng, grid, shape, half_z)
    liver, spleen, kidneys = _organs(rng, grid, shape, half_z, torso)

    # Portal-venous phase: the liver enhances to ~85-115 HU, its vessels and the spleen somewhat more.
    hu = torso.hu
    liver_hu = rng.uniform(85, 115)
    hu[liver] = liver_hu
    vessels = liver & (np.abs(_smooth_noise(rng, shape, 9)) < 0.06)
    hu[vessels] = liver_hu + rng.uniform(25, 50)
    hu[spleen] = liver_hu + rng.uniform(15, 35)
    hu[kidneys] = rng.choice([30.0, liver_hu + 80])

    # Bone: spine and ribs, over whatever organ reaches them.
    hu[torso.vertebra] = 300
    hu[torso.cortex] = 750
    hu[torso.canal] = 25
    ribs = torso.rib_band & (np.cos(2 * np.pi * grid[2] / rng.uniform(25, 35)) > 0.6)
    hu[ribs] = 650

    portal = _scanned(rng, hu)
    if phases == 1:
        return portal, liver.astype(np.uint8)
    # Arterial phase: the liver, fed mostly by the portal vein, has barely enhanced; spleen and kidney cortex have.
    arterial_liver = rng.uniform(60, 80)
    hu[liver] = arterial_liver
    hu[vessels] = arterial_liver + rng.uniform(5, 20)
    hu[spleen & ~torso.spine] = rng.uniform(120, 150)
    hu[kidneys & ~torso.spine & ~ribs] = rng.uniform(150, 190)
    return np.stack([portal, _scanned(rng, hu)]), liver.astype(np.uint8)


def _scanned(rng: np.random.Generator, hu: np.ndarray) -> np.ndarray:
    """Scanner effects: partial volume, smooth bias, noise."""
    hu = ndimage.gaussian_filter(hu, 0.6)
    hu += 8 * _smooth_noise(rng, hu.shape, 3)
    hu += rng.uniform(10, 22) * rng.standard_normal(hu.shape, dtype=np.float32)
    return hu.astype(np.float32)


def phantom_cases(n_cases: int, seed: int = DATA_SEED, channels: int = 1):
    """Yield n_cases phantom Cases with shapes around 128x128x96 and ``channels`` phases; 2/3 train, 1/6 val, the
    rest test."""
    n_val = max(1, n_cases // 6)
    n_train = n_cases - 2 * n_val
    for i in range(n_cases):
        rng = np.random.default_rng([seed, i])
        shape = (int(rng.integers(120, 137)), int(rng.integers(104, 121)), int(rng.integers(88, 105)))
        hu, label = make_phantom(rng, shape, channels)
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        origin = tuple(-(n - 1) / 2 * SPACING_MM for n in shape)
        yield Case(
            id=f"phantom_{i:03d}",
            image=ct_window(hu, *HU_WINDOW),
            label=label,
            spacing=(SPACING_MM,) * 3,
            origin=origin,
            split=split,
            source=f"synthetic phantom v{GENERATOR_VERSION}, seed {seed}, case {i}",
            extra={"intensity_percentiles": [intensity_percentiles(phase) for phase in channels_first(hu)]},
        )


def ensure_synthetic(parent: str | Path, n_cases: int, channels: int = 1) -> Path:
    """Return the folder of the cached phantom set with n_cases (and ``channels`` phases), generating it first if it
    is missing.

    Generation happens in a private temporary folder that is renamed into place, so concurrent callers and
    interrupted runs never leave a partial dataset behind.
    """
    suffix = "" if channels == 1 else f"-c{channels}"
    root = Path(parent).expanduser() / f"phantom-v{GENERATOR_VERSION}-n{n_cases}{suffix}"
    if (root / MANIFEST).is_file():
        return root
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_dataset(
            tmp,
            phantom_cases(n_cases, channels=channels),
            CLASSES,
            name="synthetic-abdominal-ct",
            modality="CT",
            preprocessing={
                "normalization": {"kind": "ct_window", "window": list(HU_WINDOW)},
                "spacing": [SPACING_MM] * 3,
                **({"channels": list(PHASES[:channels])} if channels > 1 else {}),
            },
        )
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: theirs is identical
            if not (root / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
