"""Which scans a prediction gets and where their masks go: files, DICOM series folders, folders of scans and list
files, expanded and named the same way by ``predict`` and the torch-free ``onnx_predict``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .files import why_missing
from .preparation.readers import IMAGE_SUFFIXES, CaseError, strip_suffix

Scan = tuple[Path, ...]  # one input: its channels' files (or one file holding them all)
SCANS_EXPECTED = "NIfTI/NRRD/MHA files or DICOM series folders"


def parse_scan(argument: str, relative_to: Path | None = None) -> Scan:
    """``t1.nii.gz,t2.nii.gz`` -> the files of one scan's channels; a relative path in a list file is relative to
    the list, so the list works from any working directory."""
    parts = [Path(part.strip()) for part in argument.split(",")]
    return tuple(relative_to / part if relative_to and not part.is_absolute() else part for part in parts)


def is_scan_name(name: str) -> bool:
    return name.endswith(IMAGE_SUFFIXES)


def visible_entries(folder: Path) -> list[os.DirEntry]:
    """A folder's entries but hidden ones (``.DS_Store``, a killed writer's ``.tmp-`` files), sorted by name."""
    try:
        with os.scandir(folder) as entries:
            return sorted((entry for entry in entries if not entry.name.startswith(".")), key=lambda entry: entry.name)
    except OSError as err:
        raise CaseError(f"folder {folder} cannot be listed ({err.strerror}); expected a readable folder") from None


def has_dicom_preamble(path: str) -> bool:
    """True for a DICOM Part 10 file (``DICM`` after its 128-byte preamble)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_series(folder: Path) -> bool:
    """A folder read as one DICOM series rather than a folder of scans: it holds files but no NIfTI/NRRD/MHA file,
    and either no subfolders or DICOM files among its files (a folder of series may hold a README beside them).
    Listing names only, so thousands of subfolders are classified without reading their slices."""
    files, subfolders = [], False
    for entry in visible_entries(folder):
        if is_scan_name(entry.name):
            return False
        if entry.is_dir():
            subfolders = True
        elif entry.is_file():
            files.append(entry.path)
    return bool(files) and (not subfolders or any(has_dicom_preamble(path) for path in files))


def is_series_or_unlisted(folder: Path) -> bool:
    """A subfolder taken as a scan: a DICOM series, or one that cannot be listed, which reading then names."""
    try:
        return is_dicom_series(folder)
    except CaseError:
        return True


def same_path(path: Path, other: Path) -> bool:
    """Whether two spellings name one file or folder (a symbolic link loop only matches itself; no error)."""
    return os.path.realpath(path) == os.path.realpath(other)


def scans_in_folder(folder: Path, out: Path) -> list[Scan]:
    """The scans of a folder given as an INPUT, by name: its NIfTI/NRRD/MHA files and its subfolders that are DICOM
    series. Other files and subfolders (``--out`` among them) are left alone."""
    if same_path(folder, out):
        raise CaseError(
            f"input folder {folder} is also --out, so its masks would be read as scans; choose another --out"
        )
    scans = []
    for entry in visible_entries(folder):
        path = folder / entry.name
        if entry.is_dir() and not same_path(path, out) and is_series_or_unlisted(path):
            scans.append((path,))
        elif not entry.is_dir() and is_scan_name(entry.name):
            scans.append((path,))  # an unreadable one (a link loop, a damaged file) is reported when it is read
    if not scans:
        raise CaseError(
            f"input folder {folder} holds no scans; expected {SCANS_EXPECTED} directly in it (list scans kept in "
            "deeper folders with --input-list)"
        )
    return scans


def read_input_list(path: Path) -> list[Scan]:
    """``--input-list``: one scan per line, channels joined by commas; blank lines and ``#`` comments are skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = why_missing(path) if not path.exists() else f"cannot be read ({getattr(err, 'strerror', None) or err})"
        raise CaseError(f"input list {path} {reason}; expected a text file with one scan per line") from None
    scans = [
        parse_scan(line.strip(), path.parent) for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    if not scans:
        raise CaseError(
            f"input list {path} names no scans; expected one scan per line (blank lines and # comments are skipped)"
        )
    return scans


def expand_inputs(arguments: list[Scan], input_list: Path | None, out: Path) -> list[Scan]:
    """Every scan to predict, in order: INPUT arguments (a folder that is not a DICOM series gives its scans), then
    the list file's lines; a scan given twice (a file in a folder and in the list) is predicted once."""
    scans: list[Scan] = []
    for scan in arguments:
        folder = scan[0]
        if len(scan) == 1 and folder.is_dir() and not is_dicom_series(folder):
            scans += scans_in_folder(folder, out)
        else:
            scans.append(scan)
    if input_list is not None:
        scans += read_input_list(input_list)
    if stray := [path for scan in scans for path in scan if path.suffix == ".pt"]:
        raise CaseError(f"input {stray[0]} is a checkpoint; give each member of an ensemble its own --checkpoint")
    unique = {tuple(map(os.path.realpath, scan)): scan for scan in reversed(scans)}  # the first spelling wins
    return list(reversed(unique.values()))


MASK_FORMATS = {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}  # --format -> suffix; SimpleITK writes each
Outputs = tuple[Path, Path | None]  # a scan's mask and panel (None with --no-panels)


def output_paths(
    inputs: list[Scan], out: Path, mask_format: str = "nii.gz", panels: bool = True
) -> dict[Scan, Outputs]:
    """Input -> (mask, panel) paths, named after its first file (``<name>_mask.<format>``, ``<name>_panel.png``);
    refuses two inputs that would write the same mask."""
    paths: dict[Scan, Outputs] = {}
    by_name: dict[str, Path] = {}
    suffix = MASK_FORMATS[mask_format]
    for scan in inputs:
        name = strip_suffix(scan[0])
        if name in by_name:
            raise CaseError(
                f"inputs {by_name[name]} and {scan[0]} would both write {name}_mask{suffix}; predict them into "
                "different --out folders"
            )
        by_name[name] = scan[0]
        paths[scan] = (out / f"{name}_mask{suffix}", out / f"{name}_panel.png" if panels else None)
    return paths


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    """The scans to predict, as predict and onnx_predict take them: INPUT arguments and ``--input-list``."""
    parser.add_argument(
        "inputs",
        type=parse_scan,
        nargs="*",
        metavar="INPUT",
        help="NIfTI/NRRD/MHA files, DICOM series folders, or folders of them (each scan in the folder, by name); for "
        "several channels, one file per channel joined by commas (t1.nii.gz,t2.nii.gz) in the model's channel "
        "order, or one 4-D file",
    )
    parser.add_argument(
        "--input-list",
        type=Path,
        metavar="FILE",
        help="a text file with one scan per line (channels joined by commas; blank lines and # comments skipped; "
        "relative paths are relative to the file)",
    )


def parse_scan_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, refused in one sentence when it names no scan at all."""
    args = parser.parse_args(argv)
    if not args.inputs and args.input_list is None:
        parser.error("give the scans to predict as INPUT arguments or with --input-list FILE")
    return args
