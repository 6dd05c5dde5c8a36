"""Finding image/label pairs in the folder layouts that ``prepare`` accepts.

- ``folders``: one folder per case holding an image (a file, or a DICOM series folder) and a label file, found by
  glob patterns (``image*`` and ``label*`` by default). An input may be such a case folder or a folder of them.
- ``decathlon``: the Medical Segmentation Decathlon / LiTS layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``.
- ``hdf5``: the original project's layout: one ``.h5`` file per case with ``image`` and ``label`` datasets.
- ``auto``: decathlon if the input has a ``dataset.json``, hdf5 if it holds ``.h5`` files, folders otherwise.

Layout problems (nothing found, ambiguous patterns, duplicate case ids) stop the whole run: they are not a bad case
but a wrong command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .readers import IMAGE_SUFFIXES, strip_suffix
from .shards import DatasetError

LAYOUTS = ("auto", "folders", "decathlon", "hdf5")
HDF5_SUFFIXES = (".h5", ".hdf5")


@dataclass(frozen=True)
class Source:
    """Where one case's image and label come from; ``label`` is the image file itself for the hdf5 layout."""

    id: str
    image: Path
    label: Path
    layout: str


def _visible(folder: Path) -> list[Path]:
    """Entries of a folder, without hidden files (archives often carry macOS ``._*`` companions)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _match(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))


def _detect(folder: Path) -> str:
    if (folder / "dataset.json").is_file():
        return "decathlon"
    if any(p.suffix in HDF5_SUFFIXES for p in _visible(folder)):
        return "hdf5"
    return "folders"


def _hdf5_cases(folder: Path) -> list[Source]:
    return [
        Source(strip_suffix(p), p, p, "hdf5") for p in _visible(folder) if p.is_file() and p.suffix in HDF5_SUFFIXES
    ]


def _decathlon_cases(folder: Path) -> list[Source]:
    """Pairs from dataset.json's ``training`` list, or else by name (nnU-Net's ``<case>_0000`` image names too)."""
    try:
        training = json.loads((folder / "dataset.json").read_text()).get("training")
    except json.JSONDecodeError as err:
        raise DatasetError(f"{folder / 'dataset.json'} is not valid JSON: {err}") from None
    if training:
        pairs = [(folder / item["image"], folder / item["label"]) for item in training]
    else:
        pairs = []
        for label in _visible(folder / "labelsTr"):
            stem, suffix = strip_suffix(label), label.name[len(strip_suffix(label)) :]
            image = next(
                (
                    p
                    for p in (folder / "imagesTr" / label.name, folder / "imagesTr" / f"{stem}_0000{suffix}")
                    if p.exists()
                ),
                None,
            )
            pairs.append((image or folder / "imagesTr" / label.name, label))
    return [Source(strip_suffix(label), image, label, "decathlon") for image, label in pairs]


def _single(folder: Path, pattern: str, what: str) -> Path:
    found = _match(folder, pattern)
    if len(found) != 1:
        listing = ", ".join(p.name for p in found) if found else "nothing"
        raise DatasetError(
            f"case folder {folder} must hold exactly one {what} matching {pattern!r}; it holds {listing}"
        )
    return found[0]


def _folder_cases(folder: Path, image_pattern: str, label_pattern: str) -> list[Source]:
    """``folder`` is a case if it matches the image pattern itself, otherwise each subfolder is a case."""
    case_folders = [folder] if _match(folder, image_pattern) else [p for p in _visible(folder) if p.is_dir()]
    return [
        Source(case.name, _single(case, image_pattern, "image"), _single(case, label_pattern, "label"), "folders")
        for case in case_folders
    ]


def find_cases(
    inputs: list[Path], layout: str = "auto", image_pattern: str = "image*", label_pattern: str = "label*"
) -> list[Source]:
    """Every case under the input folders, sorted by id; case ids must be unique across inputs."""
    sources: list[Source] = []
    for folder in map(Path, inputs):
        if not folder.is_dir():
            raise DatasetError(f"input {folder} is not a folder")
        kind = _detect(folder) if layout == "auto" else layout
        if kind == "hdf5":
            found = _hdf5_cases(folder)
        elif kind == "decathlon":
            found = _decathlon_cases(folder)
        else:
            found = _folder_cases(folder, image_pattern, label_pattern)
        if not found:
            raise DatasetError(
                f"input {folder} holds no {kind} cases (image suffixes read: {', '.join(IMAGE_SUFFIXES)} or DICOM "
                "folders)"
            )
        sources.extend(found)
    seen: dict[str, Source] = {}
    for source in sources:
        if source.id in seen:
            raise DatasetError(
                f"case id {source.id!r} occurs twice: {seen[source.id].image} and {source.image}; rename one"
            )
        seen[source.id] = source
    return sorted(sources, key=lambda s: s.id)
