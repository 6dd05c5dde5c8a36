"""Predicted label maps on disk, written atomically: NIfTI with the scan's geometry, or HDF5.

Arrays are (x, y, z) throughout the project; SimpleITK's are (z, y, x), hence the transposes. NIfTI files carry the
manifest's spacing, origin and direction, so they overlay the source scan in any viewer. HDF5 keeps the (x, y, z)
array as ``label`` with the same geometry as attributes, for tools that read the project's own format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .files import atomic_write
from .optional import sitk

SUFFIXES = {"nifti": ".nii.gz", "hdf5": ".h5"}
GEOMETRY = ("spacing", "origin", "direction")


def mask_path(folder: Path, case_id: str, fmt: str) -> Path:
    return Path(folder) / f"{case_id}{SUFFIXES[fmt]}"


def save_mask(path: Path, labels: np.ndarray, geometry: dict[str, Any]) -> None:
    """Write a uint8 (x, y, z) label map with ``geometry`` (a manifest record: spacing, origin, direction)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(SUFFIXES["nifti"]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))
        image.SetSpacing([float(v) for v in geometry["spacing"]])
        image.SetOrigin([float(v) for v in geometry["origin"]])
        image.SetDirection([float(v) for v in geometry["direction"]])
        atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), True))
        return

    def write_hdf5(tmp: Path) -> None:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("label", data=labels, compression="lzf")
            for key in GEOMETRY:
                h5.attrs[key] = np.asarray(geometry[key], dtype=np.float64)

    atomic_write(path, write_hdf5)


def load_mask(path: Path) -> np.ndarray:
    """The (x, y, z) label map of a file written by ``save_mask``."""
    if Path(path).name.endswith(SUFFIXES["nifti"]):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
    with h5py.File(path, "r") as h5:
        return h5["label"][()]
