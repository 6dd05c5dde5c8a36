"""Sharded HDF5 dataset format: several cases per shard file plus a ``manifest.json``.

Layout of a dataset folder::

    manifest.json            cases, splits, geometry, class voxel counts, shard sha256 and size
    shard-00000.h5           /<case id>/image   float32 (X, Y, Z), normalised; (C, X, Y, Z) for C > 1 channels
                             /<case id>/label   uint8   (X, Y, Z), class ids
                             /<case id>/foreground int32 (N, 4): (class, x, y, z) samples for oversampling
                             case attributes: spacing, origin, direction (ITK physical geometry)
                             file attributes: manifest_records, classes, channels, notes (JSON; the shard
                             describes itself)

Every dataset carries HDF5's fletcher32 checksum per chunk (manifest ``chunk_checksums``), so a corrupt chunk is
a read error naming the shard and case instead of silently changed voxels. Datasets prepared before checksums
still read; ``ShardedDataset.checksum_note`` says their corruption would go unnoticed.

Opening a dataset checks what the manifest says (classes, channels, every case's record but its split, which stays
editable) against what each shard says of itself, so a hand-edited manifest cannot train on data it misdescribes;
the comparison is of content, so a reformatted manifest still opens. Shards written before they stored their class
and channel names are checked by their counts.

Arrays are stored in (x, y, z) order, so ``spacing[i]`` belongs to array axis ``i``. A single-channel image is
stored as a 3-D array (as before channels existed); ``ShardedDataset.image`` always returns (C, X, Y, Z), and the
manifest's ``channels`` names the channels in their order. Every file is written to a
temporary name in the same folder, fsynced and renamed, so a reader never sees half a shard or half a manifest.
Readers open shard files lazily, once per process, so DataLoader workers each get their own handle.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from ..components import largest_piece_shares, split_classes
from ..exit_codes import BadInput
from ..files import atomic_write, atomic_write_text

FORMAT = "unet3d-dist-shards"
VERSION = 1
MANIFEST = "manifest.json"
FOREGROUND_SAMPLES_PER_CLASS = 10_000
Compression = Literal["lzf", "gzip", "none"]
# Measured by `python -m unet3d_dist.bench data` (docs/PERFORMANCE.md): of the layouts that read at most twice a
# crop's bytes, 16^3 lzf chunks give the most crops per CPU second, for MRI and CT and for small and large crops.
DEFAULT_COMPRESSION = "lzf"
DEFAULT_CHUNKS = (16, 16, 16)
CHUNK_CHECKSUM = "fletcher32"
DEFAULT_CHANNELS = ("image",)


class DatasetError(BadInput, RuntimeError):
    """A dataset folder, manifest or shard that cannot be used; the message names the file.

    Torch re-raises a DataLoader worker's DatasetError as a new one whose message is the worker's whole traceback;
    ``str`` gives back the worker's own sentence, so the user sees one line, not the traceback.
    """

    def __str__(self) -> str:
        message = super().__str__()
        _, found, sentence = message.rpartition(f"\n{type(self).__module__}.{type(self).__qualname__}: ")
        return sentence.strip() if found and message.startswith("Caught ") else message


@dataclass
class Case:
    """One volume ready to be written: normalised image ((X, Y, Z), or (C, X, Y, Z) for several channels), integer
    label (X, Y, Z) and its physical geometry."""

    id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    split: str = "train"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def channel_names(preprocessing: dict[str, Any]) -> list[str]:
    """The image channels a dataset (or checkpoint) was prepared with, in order, from its ``preprocessing``; one,
    ``image``, for data prepared before channels existed."""
    return list(preprocessing.get("channels", DEFAULT_CHANNELS))


def channels_first(image: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) for a 3-D (one channel) or 4-D image."""
    return image[None] if image.ndim == 3 else image


def _check_case(case: Case, num_classes: int, channels: int) -> None:
    image = channels_first(case.image)
    if image.ndim != 4 or image.shape[1:] != case.label.shape:
        raise DatasetError(
            f"case {case.id}: image {case.image.shape} must be (X, Y, Z) or (C, X, Y, Z) and label {case.label.shape} "
            "(X, Y, Z) of the same spatial shape"
        )
    if len(image) != channels:
        raise DatasetError(f"case {case.id}: image has {len(image)} channel(s); the dataset has {channels}")
    if not np.isfinite(case.image).all():
        raise DatasetError(f"case {case.id}: image contains NaN or infinite values")
    if case.label.dtype != np.uint8:
        raise DatasetError(f"case {case.id}: label must be uint8, not {case.label.dtype}")
    if case.label.max(initial=0) >= num_classes:
        raise DatasetError(f"case {case.id}: label value {int(case.label.max())} is outside the {num_classes} classes")


def foreground_samples(label: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """Up to FOREGROUND_SAMPLES_PER_CLASS voxel coordinates per foreground class, as rows (class, x, y, z)."""
    rng = np.random.default_rng(seed)
    rows = []
    for cls in range(1, num_classes):
        coords = np.argwhere(label == cls)
        if len(coords) > FOREGROUND_SAMPLES_PER_CLASS:
            coords = coords[np.sort(rng.choice(len(coords), FOREGROUND_SAMPLES_PER_CLASS, replace=False))]
        rows.append(np.column_stack([np.full(len(coords), cls), coords]))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def case_record(case: Case, shard: str, num_classes: int) -> dict[str, Any]:
    """The manifest entry of one case."""
    return {
        "id": case.id,
        "shard": shard,
        "split": case.split,
        "shape": list(case.label.shape),
        "spacing": [float(v) for v in case.spacing],
        "origin": [float(v) for v in case.origin],
        "direction": [float(v) for v in case.direction],
        "class_voxels": [int(v) for v in np.bincount(case.label.ravel(), minlength=num_classes)],
        "largest_piece_share": largest_piece_shares(case.label, num_classes),
        "image_min": [float(channel.min()) for channel in channels_first(case.image)],
        "source": case.source,
        **case.extra,
    }


def write_shard(
    path: Path,
    cases: Iterable[Case],
    classes: Sequence[str],
    compression: str = DEFAULT_COMPRESSION,
    chunks: tuple[int, int, int] = DEFAULT_CHUNKS,
    checksums: bool = True,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    notes: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Write cases to one shard atomically and return their manifest records.

    The records, the class and channel names (and any JSON-able ``notes``) are also stored in the shard's
    ``manifest_records``, ``classes``, ``channels`` and ``notes`` attributes, so a finished shard describes itself:
    an interrupted ``prepare`` resumes from it and an edited manifest is caught against it.
    ``checksums=False`` writes chunks without fletcher32, as before checksums existed (for benchmarks and tests).
    """
    cases, num_classes = list(cases), len(classes)
    for case in cases:
        _check_case(case, num_classes, len(channels))
    records = [case_record(case, path.name, num_classes) for case in cases]
    filters = {"compression": None if compression == "none" else compression, "fletcher32": checksums}

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as h5:
            for case in cases:
                group = h5.create_group(case.id)
                chunk = tuple(min(c, s) for c, s in zip(chunks, case.label.shape))
                image = channels_first(case.image).astype(np.float32)
                image, image_chunk = (image[0], chunk) if len(channels) == 1 else (image, (1, *chunk))
                group.create_dataset("image", data=image, chunks=image_chunk, **filters)
                group.create_dataset("label", data=case.label, chunks=chunk, **filters)
                group.create_dataset(
                    "foreground", data=foreground_samples(case.label, num_classes), fletcher32=checksums
                )
                for key in ("spacing", "origin", "direction"):
                    group.attrs[key] = np.asarray(getattr(case, key), dtype=np.float64)
            h5.attrs["manifest_records"] = json.dumps(records)
            h5.attrs["classes"], h5.attrs["channels"] = json.dumps(list(classes)), json.dumps(list(channels))
            h5.attrs["notes"] = json.dumps(notes or {})

    atomic_write(path, write)
    return records


def read_shard_notes(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The manifest records and notes a finished shard carries (see ``write_shard``)."""
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs["manifest_records"]), json.loads(h5.attrs["notes"])


def shard_entry(path: Path, case_ids: list[str]) -> dict[str, Any]:
    return {"file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size, "cases": case_ids}


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(Path(root) / MANIFEST, json.dumps(manifest, indent=1))


def intensity_range(records: list[dict[str, Any]], channels: list[str]) -> dict[str, list[float]] | None:
    """Per channel, [lowest 0.5 percentile, highest 99.5 percentile] of the training cases' raw intensities, which
    predict compares new scans with: pooled from each case's own percentiles (no voxel is held), so a scan like any
    training case lies inside it. All cases when none trains; None when the records carry no percentiles."""
    measured = [r for r in records if "intensity_percentiles" in r]
    pooled = [r for r in measured if r["split"] == "train"] or measured
    if not pooled:
        return None
    per_case = np.array([r["intensity_percentiles"] for r in pooled])  # (case, channel, low/high)
    return {name: [float(per_case[:, i, 0].min()), float(per_case[:, i, 1].max())] for i, name in enumerate(channels)}


def new_manifest(
    name: str,
    modality: str,
    classes: list[str],
    preprocessing: dict[str, Any],
    shards: list[dict[str, Any]],
    records: list[dict[str, Any]],
    checksums: bool = True,
) -> dict[str, Any]:
    """The manifest of shards written by ``write_shard`` with the same ``checksums``."""
    observed = intensity_range(records, channel_names(preprocessing))
    split = split_classes([record["largest_piece_share"] for record in records if "largest_piece_share" in record])
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "modality": modality,
        "classes": list(classes),
        "channels": channel_names(preprocessing),
        **({"chunk_checksums": CHUNK_CHECKSUM} if checksums else {}),
        "preprocessing": preprocessing,
        **({"intensity_range": observed} if observed else {}),
        "largest_component": split == [],  # every class one piece in its labels: keep the largest predicted piece
        "shards": shards,
        "cases": records,
    }


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def write_dataset(
    root: Path,
    cases: Iterable[Case],
    classes: list[str],
    *,
    name: str,
    modality: str,
    preprocessing: dict[str, Any],
    cases_per_shard: int = 8,
    compression: str = DEFAULT_COMPRESSION,
    chunks: tuple[int, int, int] = DEFAULT_CHUNKS,
    checksums: bool = True,
) -> dict[str, Any]:
    """Write all cases into shards of ``cases_per_shard`` and then the manifest (last, so it only lists complete
    shards).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards, records, batch = [], [], []

    channels = channel_names(preprocessing)

    def flush() -> None:
        path = root / shard_name(len(shards))
        records.extend(write_shard(path, batch, classes, compression, chunks, checksums, channels))
        shards.append(shard_entry(path, [c.id for c in batch]))
        batch.clear()

    for case in cases:
        batch.append(case)
        if len(batch) == cases_per_shard:
            flush()
    if batch:
        flush()
    manifest = new_manifest(name, modality, classes, preprocessing, shards, records, checksums)
    write_manifest(root, manifest)
    return manifest


class ShardedDataset:
    """Read access to a prepared dataset: manifest queries plus whole-volume and crop reads.

    HDF5 handles are opened on first use in each process and never shared across a fork.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.manifest = load_manifest(self.root)
        self.unchecked = check_against_shards(self.root, self.manifest)
        self.classes: list[str] = self.manifest["classes"]
        self.records = {r["id"]: r for r in self.manifest["cases"]}
        self._sizes = {s["file"]: s["bytes"] for s in self.manifest["shards"]}
        self._handles: dict[str, h5py.File] = {}
        self._pid = os.getpid()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def largest_component(self) -> bool:
        """The manifest's advice: keep each class's largest predicted piece, since every class is one piece in the
        labels (False for datasets prepared before it was recorded)."""
        return bool(self.manifest.get("largest_component", False))

    @property
    def channels(self) -> list[str]:
        """The image channels' names, in order."""
        return channel_names(self.manifest.get("preprocessing", {}))

    def pad_values(self, case_id: str) -> list[float]:
        """Each channel's minimum: what crops and sliding windows pad it with (one float in older manifests)."""
        low = self.records[case_id].get("image_min", 0.0)
        return [float(v) for v in np.broadcast_to(np.asarray(low, np.float64), (len(self.channels),))]

    @property
    def checksum_note(self) -> str | None:
        """One line for datasets prepared before chunks carried checksums (their corruption would go unnoticed)."""
        if self.manifest.get("chunk_checksums") == CHUNK_CHECKSUM:
            return None
        return (
            f"dataset {self.root} was prepared without chunk checksums, so a corrupt chunk would go unnoticed; "
            f"python -m unet3d_dist.prepare --verify {self.root} checks whole files, and preparing it again adds "
            "checksums"
        )

    @property
    def unchecked_note(self) -> str | None:
        """One line for shards written before they described themselves: the manifest cannot be checked against them."""
        if not self.unchecked:
            return None
        return (
            f"dataset {self.root} was prepared before shards carried their own records ({', '.join(self.unchecked[:3])}"
            f"{', ...' if len(self.unchecked) > 3 else ''}), so its manifest cannot be checked against them; preparing "
            "it again adds them"
        )

    def case_ids(self, split: str | None = None) -> list[str]:
        return [r["id"] for r in self.manifest["cases"] if split is None or r["split"] == split]

    def splits(self) -> list[str]:
        return sorted({r["split"] for r in self.manifest["cases"]})

    def _group(self, case_id: str) -> h5py.Group:
        if os.getpid() != self._pid:  # forked into a DataLoader worker: never reuse the parent's handles
            self._handles, self._pid = {}, os.getpid()
        shard = self.records[case_id]["shard"]
        if shard not in self._handles:
            path = self.root / shard
            if not path.is_file():
                raise DatasetError(f"shard {path} listed in the manifest is missing")
            if path.stat().st_size != self._sizes[shard]:
                raise DatasetError(
                    f"shard {path} is {path.stat().st_size} bytes but the manifest records {self._sizes[shard]}: "
                    "it is truncated or was replaced; prepare the dataset again"
                )
            try:
                self._handles[shard] = h5py.File(path, "r")
            except OSError as err:
                raise DatasetError(f"shard {path} is not a readable HDF5 file (corrupt or truncated): {err}") from None
        try:
            return self._handles[shard][case_id]
        except KeyError:
            raise DatasetError(
                f"shard {self.root / shard} has no case {case_id!r} although the manifest lists it"
            ) from None

    def _read(self, case_id: str, name: str, index: Any = ()) -> np.ndarray:
        """Read ``index`` of one array; a chunk that fails its checksum or decompression is a DatasetError."""
        shard = self.root / self.records[case_id]["shard"]
        try:
            return self._group(case_id)[name][index]
        except KeyError:
            raise DatasetError(f"shard {shard} has no {name} for case {case_id!r}; prepare the dataset again") from None
        except OSError as err:
            raise DatasetError(
                f"cannot read the {name} of case {case_id!r} from shard {shard}: a chunk is corrupt or unreadable "
                f"({err}); "
                f"run python -m unet3d_dist.prepare --verify {self.root} and prepare the dataset again"
            ) from None

    def image(self, case_id: str, index: Any = ()) -> np.ndarray:
        """(C, X, Y, Z) voxels; ``index`` selects in (x, y, z) only."""
        if len(self.channels) == 1:
            return self._read(case_id, "image", index)[None]
        return self._read(case_id, "image", (slice(None), *(index if isinstance(index, tuple) else (index,))))

    def label(self, case_id: str, index: Any = ()) -> np.ndarray:
        return self._read(case_id, "label", index)

    def foreground(self, case_id: str) -> np.ndarray:
        return self._read(case_id, "foreground")

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}


def load_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DatasetError(
            f"{root} has no {MANIFEST}: it is not a prepared dataset (run python -m unet3d_dist.prepare)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON: {err}") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DatasetError(f"{path} has format version {manifest.get('version')}, this code reads version {VERSION}")
    return manifest


EDITABLE = {"split"}  # keys of a case record that may be changed by hand in the manifest


def _self_description(shard: Path, size: int) -> dict[str, Any] | None:
    """The records, classes and channels a shard stores (the last two absent in shards written before they were
    stored); None for a shard that is missing, of the wrong size or unreadable (reading its cases names the problem)
    and {} for one written before shards stored their records."""
    if not shard.is_file() or shard.stat().st_size != size:
        return None
    try:
        with h5py.File(shard, "r") as h5:
            return {
                key: json.loads(h5.attrs[key]) for key in ("manifest_records", "classes", "channels") if key in h5.attrs
            }
    except (OSError, ValueError):
        return None


def _disagreement(manifest: dict[str, Any], shard: Path, stored: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first thing the manifest says that ``shard``'s own description contradicts: (what, manifest's, shard's)."""
    claims = {"classes": manifest["classes"], "channels": channel_names(manifest.get("preprocessing", {}))}
    for key, claimed in claims.items():
        if key in stored and stored[key] != claimed:
            return key, claimed, stored[key]
    records = {r["id"]: r for r in stored["manifest_records"]}
    listed = [r for r in manifest["cases"] if r.get("shard") == shard.name]
    if not {r["id"] for r in listed} <= set(records):
        return "the cases of this shard", sorted(r["id"] for r in listed), sorted(records)
    for claimed in listed:
        own = records[claimed["id"]]
        for key in sorted((set(claimed) | set(own)) - EDITABLE):
            if claimed.get(key) != own.get(key):
                return f"case {claimed['id']!r} {key}", claimed.get(key), own.get(key)
        for key, counted in (("classes", own["class_voxels"]), ("channels", own.get("image_min"))):
            if isinstance(counted, list) and len(counted) != len(claims[key]):  # shards that do not store the names
                return key, claims[key], f"{len(counted)} {key}"
    return None


def check_against_shards(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Raise DatasetError when the manifest says what a shard's own description contradicts; return the shards that
    carry no description (written before shards stored their records), which cannot be checked."""
    unchecked = []
    for entry in manifest["shards"]:
        shard = Path(root) / entry["file"]
        stored = _self_description(shard, entry["bytes"])
        if stored is not None and "manifest_records" not in stored:
            unchecked.append(entry["file"])
        elif stored is not None and (found := _disagreement(manifest, shard, stored)):
            what, claimed, own = found
            raise DatasetError(
                f"{Path(root) / MANIFEST} gives {what} as {claimed!r} but shard {shard} records {own!r}: the manifest "
                "was edited or belongs to other shards; undo the edit or prepare the dataset again"
            )
    return unchecked


def verify_dataset(root: Path) -> list[str]:
    """Check every shard's size and sha256 against the manifest, and the manifest against what each shard says of
    itself; return one line per problem."""
    manifest = load_manifest(Path(root))
    try:
        check_against_shards(Path(root), manifest)
        problems = []
    except DatasetError as err:
        problems = [str(err)]
    for shard in manifest["shards"]:
        path = Path(root) / shard["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
        elif sha256_of(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems
