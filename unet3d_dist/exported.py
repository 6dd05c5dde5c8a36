"""What an exported ensemble member records beside its network, so that a scan can be segmented from the file alone.

``python -m unet3d_dist.export`` writes one ``member-<i>.onnx`` per checkpoint and puts a ``Recorded`` into each
file's metadata_props (every value a JSON string); ``python -m unet3d_dist.onnx_predict`` reads it back. Neither
side needs the other's libraries: this module imports neither PyTorch nor ONNX.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .exit_codes import BadInput

FORMAT_VERSION = 1  # raised whenever a key changes meaning; a reader refuses files newer than it knows
FORMAT_KEY = "unet3d_dist_format"
MEMBER_PATTERN = re.compile(r"^member-(\d+)\.onnx$")
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ExportError(BadInput, ValueError):
    """An export folder or file that cannot be written or used; the message says which and why."""


def member_file(index: int) -> str:
    return f"member-{index}.onnx"


@dataclass(frozen=True)
class Recorded:
    """One member's network contract (input channels, output classes) and how it looks at a scan."""

    member: int  # its place in the ensemble, and the ensemble's size: a left-over file of another export shows
    members: int
    classes: list[str]
    channels: list[str]
    modality: str
    spacing: list[float] | None  # the spacing its training data was resampled to, if it was
    preprocessing: dict[str, Any]  # the training data's whole preprocessing, which new scans repeat
    patch: list[int]
    tta_axes: list[int]
    overlap: float
    batch_size: int
    largest_component: bool
    intensity_range: dict[str, list[float]] | None
    checkpoint: str  # the file it was exported from

    def properties(self) -> dict[str, str]:
        """The ONNX metadata_props: each field as a JSON string, and the format version."""
        return {
            FORMAT_KEY: json.dumps(FORMAT_VERSION),
            **{key: json.dumps(value) for key, value in asdict(self).items()},
        }

    @classmethod
    def from_properties(cls, properties: Mapping[str, str], where: object) -> Recorded:
        """The record of a file's metadata_props; ExportError if ``where`` was not written by this exporter."""
        if FORMAT_KEY not in properties:
            raise ExportError(f"{where} was not written by unet3d_dist.export (its metadata has no {FORMAT_KEY})")
        missing = [field.name for field in fields(cls) if field.name not in properties]
        if missing:
            raise ExportError(f"{where} records no {', '.join(missing)} in its metadata")
        try:
            version = json.loads(properties[FORMAT_KEY])
            values = {field.name: json.loads(properties[field.name]) for field in fields(cls)}
        except ValueError as err:
            raise ExportError(f"{where} holds metadata that is not JSON ({err})") from None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ExportError(
                f"{where} has export format {version}, not one this version reads (up to {FORMAT_VERSION}); "
                "update unet3d-dist"
            )
        return cls(**values)


def ensemble_problem(records: Sequence[Recorded], names: Sequence[object]) -> str | None:
    """Why these members cannot be run as one ensemble here: other classes, channels or preprocessing, or another
    spacing (the PyTorch segmenter resamples such a member; the ONNX predictor does not)."""
    first, name = records[0], names[0]
    for other, other_name in zip(records[1:], names[1:]):
        for what in ("classes", "channels"):
            mine, theirs = getattr(first, what), getattr(other, what)
            if mine != theirs:
                return f"members {name} and {other_name} have different {what} ({mine} and {theirs})"
        pre, other_pre = without_spacing(first.preprocessing), without_spacing(other.preprocessing)
        for key in sorted(set(pre) | set(other_pre)):
            if pre.get(key) != other_pre.get(key):
                values = f"preprocessing.{key}: {pre.get(key)!r} and {other_pre.get(key)!r}"
                return f"members {name} and {other_name} were trained on data prepared differently ({values})"
        if first.spacing != other.spacing:
            return (
                f"members {name} and {other_name} were trained at different spacings ({first.spacing} and "
                f"{other.spacing} mm); the ONNX predictor does not resample between members as the PyTorch "
                "segmenter does, so segment with unet3d_dist.predict or export members of one spacing"
            )
    return None


def without_spacing(preprocessing: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in preprocessing.items() if key != "spacing"}


def member_files(folder: Path) -> list[Path]:
    """The ``member-<i>.onnx`` files of an export folder, by index; ExportError for a folder without them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"--model {folder} {'is not a folder' if folder.exists() else 'does not exist'}")
    found = {int(match[1]): path for path in folder.iterdir() if (match := MEMBER_PATTERN.match(path.name))}
    if not found:
        raise ExportError(f"--model {folder} holds no member-<i>.onnx files; write them with unet3d_dist.export")
    return [found[index] for index in sorted(found)]


def check_numbering(records: Sequence[Recorded], paths: Sequence[Path]) -> None:
    """Every member of one export and nothing else: member-0 to member-(n-1), each saying it is one of n."""
    for index, (record, path) in enumerate(zip(records, paths)):
        if (record.member, record.members) != (index, len(paths)) or path.name != member_file(index):
            raise ExportError(
                f"{path} was exported as member {record.member} of {record.members}, but the folder holds "
                f"{', '.join(p.name for p in paths)}; export the ensemble into an empty folder (or with --overwrite)"
            )
