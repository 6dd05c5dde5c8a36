"""Reading scans as SimpleITK images: NIfTI, NRRD, MHA, DICOM series folders and the original project's HDF5 files.

Every reader returns complete, single-channel 3-D images (a 4-D file is split into its channels) or raises
``CaseError`` naming the file and what was expected. ITK itself reads a truncated NIfTI file without complaint and
silently drops unreadable DICOM slices, so completeness is checked here before any voxel is trusted.

Arrays follow the project's convention: (x, y, z) order, so ``spacing[i]`` belongs to array axis ``i``
(``sitk.GetArrayFromImage`` gives (z, y, x); the helpers below transpose).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import h5py
import numpy as np

from ..exit_codes import BadInput
from ..files import why_missing
from ..optional import sitk

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_INDEX_FILES = {"DICOMDIR"}
SPACING_TOLERANCE = 1e-3  # relative
ORIGIN_TOLERANCE = 1e-2  # in voxels
DIRECTION_TOLERANCE = 1e-3


class CaseError(BadInput, ValueError):
    """One input case that cannot be used; the message names the file and what was expected."""


def array_xyz(image: sitk.Image) -> np.ndarray:
    """The voxels of ``image`` as a contiguous (x, y, z) array."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def image_xyz(
    array: np.ndarray, like: sitk.Image | None = None, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
) -> sitk.Image:
    """An image from an (x, y, z) array, with the geometry of ``like`` (or ``spacing`` at the origin, axis-aligned)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    if like is not None:
        image.CopyInformation(like)
    else:
        image.SetSpacing([float(s) for s in spacing])
    return image


def strip_suffix(path: Path) -> str:
    """``case_001.nii.gz`` -> ``case_001``; folders keep their name."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES + (".h5", ".hdf5"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _itk_reason(err: RuntimeError) -> str:
    """The informative last line of a multi-line ITK exception."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else str(err)


def _uncompressed_size(path: Path) -> int:
    """Bytes of a gzip file once inflated; raises CaseError when the stream is cut short or damaged."""
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                total += len(block)
    except (EOFError, OSError, zlib.error) as err:
        raise CaseError(f"{path} is truncated or not valid gzip ({err})") from None
    return total


def _check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI file that holds fewer bytes than its header promises (ITK would pad it with garbage)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise CaseError(f"cannot read {path}: {_itk_reason(err)}") from None
    offset, bits = (
        int(float(reader.GetMetaData("vox_offset"))),
        int(reader.GetMetaData("bitpix")),
    )  # ITK's NIfTI header keys
    expected = offset + int(np.prod(reader.GetSize())) * bits // 8
    actual = _uncompressed_size(path) if path.name.endswith(".gz") else path.stat().st_size
    if actual < expected:
        raise CaseError(f"{path} is truncated: its header promises {expected} bytes but it holds {actual}")


def _slice_positions(reader: sitk.ImageSeriesReader, count: int, normal: np.ndarray) -> np.ndarray:
    return np.array(
        [normal @ np.array([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]) for i in range(count)]
    )


def _read_dicom_series(folder: Path) -> sitk.Image:
    """One DICOM series from a folder holding nothing else; refuses missing, unreadable or unevenly spaced slices."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise CaseError(f"{folder} holds no readable DICOM series")
    if len(series) > 1:
        raise CaseError(f"{folder} holds {len(series)} DICOM series; expected a folder with exactly one")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    present = {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")} - DICOM_INDEX_FILES
    strays = sorted(present - {Path(f).name for f in files})
    if strays:
        raise CaseError(
            f"{folder}: {len(strays)} file(s) are not readable slices of its series ({', '.join(strays[:3])}): "
            "truncated, damaged or not DICOM"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise CaseError(f"cannot read the DICOM series in {folder}: {_itk_reason(err)}") from None
    if len(files) > 2:
        normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
        gaps = np.diff(np.sort(_slice_positions(reader, len(files), normal)))
        if gaps.max() - gaps.min() > 0.01 * np.median(gaps):
            raise CaseError(
                f"{folder}: slices are unevenly spaced ({gaps.min():.3g} to {gaps.max():.3g} mm apart); a slice is "
                "missing"
            )
    return image


def read_volumes(path: str | Path) -> list[sitk.Image]:
    """The 3-D volumes of a file: one, or each volume of a 4-D image (the Decathlon stores channels so)."""
    image = _read_any(Path(path))
    if image.GetDimension() == 4 and image.GetNumberOfComponentsPerPixel() == 1:
        return [image[:, :, :, t] for t in range(image.GetSize()[3])]
    return [_single_channel(image, path)]


def read_image(path: str | Path) -> sitk.Image:
    """A single-channel 3-D image from a NIfTI/NRRD/MHA file or a DICOM series folder."""
    return _single_channel(_read_any(Path(path)), path)


def _read_any(path: Path) -> sitk.Image:
    if path.is_dir():
        image = _read_dicom_series(path)
    elif not path.is_file():
        raise CaseError(f"{path} {why_missing(path)}")
    else:
        if path.name.endswith((".nii", ".nii.gz")):
            _check_nifti_complete(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise CaseError(f"cannot read {path}: {_itk_reason(err)}") from None
    return image


def _single_channel(image: sitk.Image, path: object) -> sitk.Image:
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(
            f"{path} is a {image.GetDimension()}-D image with {image.GetNumberOfComponentsPerPixel()} channel(s); "
            "expected a single-channel 3-D volume"
        )
    return image


def check_voxels(image: sitk.Image, path: object) -> None:
    """Refuse NaN or infinite voxels, which resampling, z-scoring and the network would spread, and an image of one
    value (a blank export), which normalisation turns into zeros that look like data; prepare and predict both call
    this, so they refuse with the same sentence."""
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        raise CaseError(f"image {path} holds {np.count_nonzero(~np.isfinite(voxels))} NaN or infinite voxels")
    if voxels.min() == voxels.max():
        raise CaseError(
            f"image {path} has the same value ({voxels.flat[0]:g}) in every voxel; expected a scan, not a blank volume"
        )


def check_same_grid(image: sitk.Image, other: sitk.Image, image_path: object, other_path: object, what: str) -> None:
    """Refuse a label or another channel (``what`` it is) that does not lie voxel for voxel on the image's grid (to
    1/100 of a voxel)."""
    spacing = np.array(image.GetSpacing())
    problems = []
    if image.GetSize() != other.GetSize():
        problems.append(f"size {other.GetSize()} vs {image.GetSize()}")
    if not np.allclose(other.GetSpacing(), spacing, rtol=SPACING_TOLERANCE, atol=0):
        problems.append(f"spacing {other.GetSpacing()} vs {image.GetSpacing()}")
    if np.abs(np.subtract(other.GetOrigin(), image.GetOrigin())).max() > ORIGIN_TOLERANCE * spacing.min():
        problems.append(f"origin {other.GetOrigin()} vs {image.GetOrigin()}")
    if not np.allclose(other.GetDirection(), image.GetDirection(), atol=DIRECTION_TOLERANCE):
        problems.append(f"direction {other.GetDirection()} vs {image.GetDirection()}")
    if problems:
        raise CaseError(f"{what} {other_path} is not on the grid of image {image_path}: {'; '.join(problems)}")


def read_channels(paths: tuple[Path, ...], names: list[str], whose: str) -> list[sitk.Image]:
    """The channels ``names`` (``whose`` they are, for the message) from one file per channel, or from one 4-D file
    holding them all, on one grid, finite and not constant; a channel stored with flipped or permuted axes is
    reoriented to the first's axes."""
    volumes = [(path, volume) for path in paths for volume in read_volumes(path)]
    if len(volumes) != len(names):
        files = " and ".join(map(str, paths))
        raise CaseError(
            f"{files} hold{'s' if len(paths) == 1 else ''} {len(volumes)} image channel(s); {whose} "
            f"{len(names)} ({', '.join(names)}), one file per channel in that order or one 4-D file"
        )
    (first_path, first), channels = volumes[0], []
    for name, (path, volume) in zip(names, volumes):
        if channels:
            volume = sitk.DICOMOrient(volume, _orientation(first))
            check_same_grid(first, volume, first_path, path, f"channel {name}")
        check_voxels(volume, path if len(names) == 1 else f"{path} (channel {name})")
        channels.append(volume)
    return channels


def _orientation(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def read_pair(image_paths: tuple[Path, ...], label_path: Path, names: list[str]) -> tuple[list[sitk.Image], sitk.Image]:
    """Image channels and label file (or a DICOM folder and a label file) on one grid; a label stored with flipped
    or permuted axes is reoriented to the image's axes first."""
    channels, label = read_channels(image_paths, names, "the recipe's input.channels names"), read_image(label_path)
    label = sitk.DICOMOrient(label, _orientation(channels[0]))
    check_same_grid(channels[0], label, image_paths[0], label_path, "label")
    return channels, label


def read_hdf5_pair(path: Path, spacing: tuple[float, float, float]) -> tuple[sitk.Image, sitk.Image]:
    """The original project's layout: one file per case with (x, y, z) datasets ``image`` and ``label`` and no
    geometry.
    """
    if not path.is_file():
        raise CaseError(f"{path} {why_missing(path)}")
    try:
        with h5py.File(path, "r") as h5:
            missing = [name for name in ("image", "label") if name not in h5]
            if missing:
                raise CaseError(
                    f"{path} has no dataset {' or '.join(map(repr, missing))}; it holds: {', '.join(h5) or 'nothing'}"
                )
            image, label = h5["image"][()], h5["label"][()]
    except OSError as err:
        raise CaseError(f"cannot read {path}: {err}") from None
    for name, array in (("image", image), ("label", label)):
        if array.ndim != 3:
            raise CaseError(f"{path}: {name} has shape {array.shape}; expected a 3-D (x, y, z) array")
    if image.shape != label.shape:
        raise CaseError(f"{path}: image shape {image.shape} and label shape {label.shape} differ")
    return image_xyz(image, spacing=spacing), image_xyz(label, spacing=spacing)
