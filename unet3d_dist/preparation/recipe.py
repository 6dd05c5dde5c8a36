"""The YAML recipe of ``python -m unet3d_dist.prepare``: where cases come from and what is done to them.

Sections mirror the steps: ``input`` (layout), ``labels`` (class mapping), ``preprocessing`` (recorded in the
manifest and every checkpoint, so prediction repeats it), ``splits`` and ``shards``. Every key has a default except
``name``, ``modality`` and ``labels.classes``; see configs/prepare_*.yaml. Keys are typed ``setting``s, read by the
training config's ``fill``: an unknown key or a bad value stops the run with one sentence naming the key, and
``python -m unet3d_dist.train --help-config`` lists them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, fill, read_yaml, setting
from ..data.shards import DEFAULT_CHANNELS, DEFAULT_CHUNKS, DEFAULT_COMPRESSION, Compression
from .layouts import Layout
from .preprocess import CANONICAL_ORIENTATION, Interpolation, channel_normalization, check_normalization

AXIS_LETTERS = ({"L", "R"}, {"P", "A"}, {"S", "I"})
MIN_SPACING_MM = 1e-6  # spacings must be positive; bounds are inclusive


@dataclass
class InputSpec:
    """Where each case's files are and what they are called."""

    layout: Layout = setting(
        "auto", "how the cases are stored; auto: decathlon with a dataset.json, hdf5 with .h5 files, else folders"
    )
    image: str = setting("image*", "folders layout: glob of the image (file or DICOM folder) inside a case folder")
    label: str = setting("label*", "folders layout: glob of the label file")
    spacing: list[float] = setting(
        [1.0, 1.0, 1.0],
        "hdf5 layout: the voxel spacing (x, y, z) in mm, as the files carry none",
        min=MIN_SPACING_MM,
        length=3,
    )
    channels: dict[str, str] | list[str] | None = setting(
        None,
        "several image channels, in the order the network sees them: {name: glob} (folders layout, one file per "
        "channel) or [names] (a 4-D image per case, or the Decathlon's <case>_0000, _0001, ... files); null: one",
    )

    @property
    def names(self) -> list[str]:
        """The channels' names in order; one channel is called ``image``."""
        return list(self.channels or DEFAULT_CHANNELS)

    @property
    def image_patterns(self) -> dict[str, str]:
        """Channel name -> glob of its file in a case folder (one glob for a single file, perhaps 4-D)."""
        return dict(self.channels) if isinstance(self.channels, dict) else {self.names[0]: self.image}


@dataclass
class LabelSpec:
    """Which source label values make each class."""

    classes: dict[str, list[int]] = setting(
        {}, "class name -> source label values, background first; at least two classes (required)"
    )
    unmapped: Literal["error", "background"] = setting(
        "error", "a source value that no class lists: error skips the case, background makes it background"
    )


@dataclass
class CropSpec:
    """What each prepared case is cut down to."""

    to: Literal["none", "foreground", "body"] = setting(
        "none",
        "the box kept: the whole scan (none), the labelled classes (foreground) or the voxels above threshold (body)",
    )
    margin_mm: float = setting(0.0, "margin around that box, in mm", min=0.0)
    threshold: float = setting(-500.0, "body: raw intensity (HU for CT) above which a voxel is body")


@dataclass
class PreprocessSpec:
    """What every scan goes through; recorded in the manifest and every checkpoint, so prediction repeats it."""

    normalization: dict[str, Any] = setting(
        {"kind": "none"},
        "intensities: {kind: ct_window, window: [low, high]}, {kind: zscore, nonzero: false} or {kind: none}, for "
        "every channel (each on its own statistics), or {channel name: one of those}",
    )
    spacing: list[float] | None = setting(
        None, "target spacing (x, y, z) in mm; null keeps the source spacing", min=MIN_SPACING_MM, length=3
    )
    interpolation: Interpolation = setting("linear", "how images are resampled (labels always by nearest neighbour)")
    orientation: str | None = setting(
        CANONICAL_ORIENTATION,
        "canonical axis order in ITK letters, one of L/R, P/A and S/I; null keeps the stored axes",
    )
    crop: CropSpec = field(default_factory=CropSpec)


@dataclass
class SplitSpec:
    """How the cases are dealt into splits; prepare --splits FILE replaces all of this."""

    train: float = setting(0.8, "share of the cases for training", min=0.0, max=1.0)
    val: float = setting(0.2, "share of the cases for validation", min=0.0, max=1.0)
    test: float = setting(0.0, "share of the cases for testing; the three shares add up to 1", min=0.0, max=1.0)
    seed: int = setting(0, "seed of the shuffle before the cases are cut into splits")


@dataclass
class ShardSpec:
    """How the prepared cases are packed into HDF5 files."""

    cases_per_shard: int = setting(8, "cases per HDF5 shard file", min=1)
    compression: Compression = setting(DEFAULT_COMPRESSION, "HDF5 compression of the volumes")
    chunks: list[int] = setting(list(DEFAULT_CHUNKS), "HDF5 chunk shape (x, y, z) in voxels", min=1, length=3)


@dataclass
class Recipe:
    """A prepare recipe: where the cases come from and what is done to them."""

    name: str = setting("", "the dataset's name, recorded in its manifest (required)")
    modality: str = setting(
        "", "CT or MRI, recorded in the manifest; what differs comes from preprocessing.normalization (required)"
    )
    input: InputSpec = field(default_factory=InputSpec)
    labels: LabelSpec = field(default_factory=LabelSpec)
    preprocessing: PreprocessSpec = field(default_factory=PreprocessSpec)
    splits: SplitSpec = field(default_factory=SplitSpec)
    shards: ShardSpec = field(default_factory=ShardSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def manifest_preprocessing(self) -> dict[str, Any]:
        """What the manifest records under ``preprocessing``: everything prediction must repeat (the channels in their
        order included), plus the label map."""
        return {
            **dataclasses.asdict(self.preprocessing),
            "channels": self.input.names,
            "labels": dataclasses.asdict(self.labels),
        }


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a prepare recipe."""
    return recipe_from_dict(read_yaml(path, "recipe") or {})


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    """A validated recipe from its YAML mapping (as ``Recipe.to_dict`` writes it)."""
    recipe = Recipe()
    fill(recipe, values, "recipe")
    _check_rules(recipe)
    return recipe


def _check_rules(recipe: Recipe) -> None:
    """What the keys' types cannot say: required keys, and rules that span keys."""
    for key in ("name", "modality"):
        if not getattr(recipe, key):
            raise ConfigError(f"the recipe needs a non-empty string '{key}'")
    names = list(recipe.input.channels or ())
    if recipe.input.channels is not None and (not names or len(set(names)) != len(names)):
        raise ConfigError(f"input.channels must name at least one channel, each once, not {recipe.input.channels!r}")
    if recipe.input.layout == "hdf5" and len(names) > 1:
        raise ConfigError("input.channels: the hdf5 layout holds one image per case; it cannot have channels")
    if len(recipe.labels.classes) < 2:
        raise ConfigError("labels.classes must map at least two class names (background first) to source label values")
    _check_preprocessing(recipe.preprocessing, recipe.input.names)
    shares = [recipe.splits.train, recipe.splits.val, recipe.splits.test]
    if abs(sum(shares) - 1) > 1e-6:
        raise ConfigError(f"splits.train, splits.val and splits.test must add up to 1, not {shares}")


def _check_preprocessing(spec: PreprocessSpec, channels: list[str]) -> None:
    """A normalization for every channel, and an orientation that names each axis once."""
    try:
        check_normalization(spec.normalization)
        for name in channels:
            channel_normalization(spec.normalization, name)
    except ValueError as err:
        raise ConfigError(f"preprocessing.{err}") from None
    letters = spec.orientation
    if letters is not None and not (len(letters) == 3 and all(len(set(letters) & axis) == 1 for axis in AXIS_LETTERS)):
        raise ConfigError(
            "preprocessing.orientation must be three letters, one of L/R, P/A and S/I (e.g. LPS), or null, "
            f"not {letters!r}"
        )
