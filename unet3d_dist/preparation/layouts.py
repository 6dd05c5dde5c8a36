"""Finding image/label pairs in the folder layouts that ``prepare`` accepts.

- ``folders``: one folder per case holding an image (a file, or a DICOM series folder) and a label file, found by
  glob patterns (``image*`` and ``label*`` by default); with several channels, one glob per channel
  (``input.channels: {t1: "t1*", t2: "t2*"}``). An input may be such a case folder or a folder of them.
- ``decathlon``: the Medical Segmentation Decathlon / LiTS layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``;
  a case's channels are one 4-D image or nnU-Net's ``<case>_0000``, ``<case>_0001``, ... files.
- ``hdf5``: the original project's layout: one ``.h5`` file per case with ``image`` and ``label`` datasets.
- ``auto``: decathlon if the input has a ``dataset.json``, hdf5 if it holds ``.h5`` files, folders otherwise.

Layout problems (nothing found, ambiguous patterns, duplicate case ids) stop the whole run: they are not a bad case
but a wrong command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..data.shards import DatasetError
from ..files import why_missing
from .readers import IMAGE_SUFFIXES, strip_suffix

Layout = Literal["auto", "folders", "decathlon", "hdf5"]
HDF5_SUFFIXES = (".h5", ".hdf5")


@dataclass(frozen=True)
class Source:
    """Where one case's image channels and label come from: one file per channel, or one file holding them all (a
    4-D image); ``label`` is the image file itself for the hdf5 layout."""

    id: str
    images: tuple[Path, ...]
    label: Path
    layout: str

    @property
    def image(self) -> Path:
        """The (first) image file, the one messages name."""
        return self.images[0]


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
    """Every ``.h5`` entry but folders: a broken link or link loop is a case the reader refuses, not one ignored."""
    return [
        Source(strip_suffix(p), (p,), p, "hdf5")
        for p in _visible(folder)
        if not p.is_dir() and p.suffix in HDF5_SUFFIXES
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
        pairs = [(folder / "imagesTr" / label.name, label) for label in _visible(folder / "labelsTr")]
    return [Source(strip_suffix(label), _channel_files(image), label, "decathlon") for image, label in pairs]


def _channel_files(image: Path) -> tuple[Path, ...]:
    """``image`` itself if it exists (one file, perhaps 4-D), else nnU-Net's ``<case>_0000``, ``_0001``, ... files
    beside it (a missing image stays ``image``, for the reader to name)."""
    if image.exists():
        return (image,)
    stem, suffix = strip_suffix(image), image.name[len(strip_suffix(image)) :]
    numbered = sorted(image.parent.glob(f"{stem}_[0-9][0-9][0-9][0-9]{suffix}"))
    return tuple(numbered) or (image,)


def _single(folder: Path, pattern: str, what: str) -> Path:
    found = _match(folder, pattern)
    if len(found) != 1:
        listing = ", ".join(p.name for p in found) if found else "nothing"
        raise DatasetError(
            f"case folder {folder} must hold exactly one {what} matching {pattern!r}; it holds {listing}"
        )
    return found[0]


def _folder_cases(folder: Path, image_patterns: dict[str, str], label_pattern: str) -> list[Source]:
    """``folder`` is a case if it matches the first image pattern itself, otherwise each subfolder is a case."""
    first = next(iter(image_patterns.values()))
    case_folders = [folder] if _match(folder, first) else [p for p in _visible(folder) if p.is_dir()]
    return [
        Source(
            case.name,
            tuple(_single(case, pattern, f"{name} image") for name, pattern in image_patterns.items()),
            _single(case, label_pattern, "label"),
            "folders",
        )
        for case in case_folders
    ]


def find_cases(
    inputs: list[Path],
    layout: str = "auto",
    image_patterns: dict[str, str] | None = None,
    label_pattern: str = "label*",
) -> list[Source]:
    """Every case under the input folders, sorted by id; case ids must be unique across inputs. ``image_patterns``
    (channel name -> glob) finds the images of the folders layout; ``{"image": "image*"}`` by default."""
    sources: list[Source] = []
    for folder in map(Path, inputs):
        if not folder.is_dir():
            raise DatasetError(f"input {folder} {why_missing(folder, 'is not a folder')}")
        kind = _detect(folder) if layout == "auto" else layout
        if kind == "hdf5":
            found = _hdf5_cases(folder)
        elif kind == "decathlon":
            found = _decathlon_cases(folder)
        else:
            found = _folder_cases(folder, image_patterns or {"image": "image*"}, label_pattern)
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
