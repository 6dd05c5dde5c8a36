"""The YAML recipe of ``python -m unet3d_dist.prepare``: where cases come from and what is done to them.

Sections mirror the steps: ``input`` (layout), ``labels`` (class mapping), ``preprocessing`` (recorded in the
manifest and every checkpoint, so prediction repeats it), ``splits`` and ``shards``. Every key has a default except
``name``, ``modality`` and ``labels.classes``; see configs/prepare_*.yaml. An unknown key or a bad value stops the run
with one sentence naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, read_yaml
from ..data.shards import COMPRESSIONS, DEFAULT_CHANNELS, DEFAULT_CHUNKS, DEFAULT_COMPRESSION
from .layouts import LAYOUTS
from .preprocess import CANONICAL_ORIENTATION, INTERPOLATORS, channel_normalization, check_normalization

AXIS_LETTERS = ({"L", "R"}, {"P", "A"}, {"S", "I"})


@dataclass
class InputSpec:
    layout: str = "auto"  # auto | folders | decathlon | hdf5
    image: str = "image*"  # folders layout: glob of the image (file or DICOM folder) inside a case folder
    label: str = "label*"  # folders layout: glob of the label file
    spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # hdf5 layout: the files carry no geometry
    # Several image channels, in the order the network sees them: {name: glob} (folders layout, one file per
    # channel) or [names] (a 4-D image per case, or the Decathlon's <case>_0000, _0001, ... files). None: one channel.
    channels: dict[str, str] | list[str] | None = None

    def check(self) -> None:
        _one_of("input.layout", self.layout, LAYOUTS)
        _triple("input.spacing", self.spacing)
        names = list(self.channels or [])
        if self.channels is not None and not (
            names
            and all(isinstance(n, str) and n for n in names)
            and len(set(names)) == len(names)
            and (not isinstance(self.channels, dict) or all(isinstance(g, str) and g for g in self.channels.values()))
        ):
            raise ConfigError(
                "input.channels must name the image channels, as a mapping {name: glob} or a list of distinct names, "
                f"not {self.channels!r}"
            )
        if self.layout == "hdf5" and len(names) > 1:
            raise ConfigError("input.channels: the hdf5 layout holds one image per case; it cannot have channels")

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
    classes: dict[str, list[int]] = field(default_factory=dict)  # class name -> source values; background first
    unmapped: str = "error"  # a source value no class lists: error (skip the case) | background

    def check(self) -> None:
        if not isinstance(self.classes, dict) or len(self.classes) < 2:
            raise ConfigError(
                "labels.classes must map at least two class names (background first) to lists of source label values"
            )
        for name, values in self.classes.items():
            if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"labels.classes.{name} must be a list of integer label values, not {values!r}")
        _one_of("labels.unmapped", self.unmapped, ("error", "background"))


@dataclass
class CropSpec:
    to: str = "none"  # none | foreground (the labelled classes) | body (voxels above threshold)
    margin_mm: float = 0.0
    threshold: float = -500.0  # body: raw intensity (HU for CT) above which a voxel is body

    def check(self) -> None:
        _one_of("preprocessing.crop.to", self.to, ("none", "foreground", "body"))
        if not isinstance(self.margin_mm, (int, float)) or self.margin_mm < 0:
            raise ConfigError(f"preprocessing.crop.margin_mm must be a number >= 0, not {self.margin_mm!r}")


@dataclass
class PreprocessSpec:
    # one spec for every channel (each normalised on its own statistics), or {channel name: spec}
    normalization: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    spacing: list[float] | None = None  # target spacing in mm per axis; null keeps the source spacing
    interpolation: str = "linear"  # images: linear | cubic (labels always nearest)
    orientation: str | None = CANONICAL_ORIENTATION  # canonical axis order, ITK letters; null keeps the stored axes
    crop: CropSpec = field(default_factory=CropSpec)

    def check(self) -> None:
        try:
            check_normalization(self.normalization)
        except ValueError as err:
            raise ConfigError(f"preprocessing.{err}") from None
        if self.spacing is not None:
            _triple("preprocessing.spacing", self.spacing)
        _one_of("preprocessing.interpolation", self.interpolation, tuple(INTERPOLATORS))
        if self.orientation is not None and not (
            isinstance(self.orientation, str)
            and len(self.orientation) == 3
            and all(len(set(self.orientation) & letters) == 1 for letters in AXIS_LETTERS)
        ):
            raise ConfigError(
                "preprocessing.orientation must be three letters, one of L/R, P/A and S/I (e.g. LPS), or null, "
                f"not {self.orientation!r}"
            )
        self.crop.check()


@dataclass
class SplitSpec:
    train: float = 0.8
    val: float = 0.2
    test: float = 0.0
    seed: int = 0  # the shuffle before cutting; --splits FILE replaces all of this

    def check(self) -> None:
        fractions = [self.train, self.val, self.test]
        if any(not isinstance(f, (int, float)) or f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ConfigError(
                f"splits.train, splits.val and splits.test must be fractions >= 0 that add up to 1, not {fractions}"
            )


@dataclass
class ShardSpec:
    cases_per_shard: int = 8
    compression: str = DEFAULT_COMPRESSION  # lzf | gzip | none
    chunks: list[int] = field(default_factory=lambda: list(DEFAULT_CHUNKS))  # HDF5 chunk shape (x, y, z)

    def check(self) -> None:
        if not isinstance(self.cases_per_shard, int) or self.cases_per_shard < 1:
            raise ConfigError(f"shards.cases_per_shard must be an integer >= 1, not {self.cases_per_shard!r}")
        _one_of("shards.compression", self.compression, COMPRESSIONS)
        if not (
            isinstance(self.chunks, list)
            and len(self.chunks) == 3
            and all(isinstance(c, int) and c > 0 for c in self.chunks)
        ):
            raise ConfigError(f"shards.chunks must be three positive integers, not {self.chunks!r}")


@dataclass
class Recipe:
    name: str = ""
    modality: str = ""  # CT or MRI (recorded; CT/MRI behaviour comes from preprocessing.normalization)
    input: InputSpec = field(default_factory=InputSpec)
    labels: LabelSpec = field(default_factory=LabelSpec)
    preprocessing: PreprocessSpec = field(default_factory=PreprocessSpec)
    splits: SplitSpec = field(default_factory=SplitSpec)
    shards: ShardSpec = field(default_factory=ShardSpec)

    def check(self) -> None:
        for key in ("name", "modality"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"the recipe needs a non-empty string '{key}'")
        for section in (self.input, self.labels, self.preprocessing, self.splits, self.shards):
            section.check()
        try:
            for name in self.input.names:
                channel_normalization(self.preprocessing.normalization, name)
        except ValueError as err:
            raise ConfigError(f"preprocessing.{err}") from None

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


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, not {value!r}")


def _triple(key: str, value: Any) -> None:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) and v > 0 for v in value)):
        raise ConfigError(f"{key} must be three positive numbers in mm (x, y, z), not {value!r}")


def _build(cls: type, values: Any, where: str) -> Any:
    """A dataclass from a YAML mapping, recursing into nested sections and refusing unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'the recipe'} must be a mapping, not {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown recipe key '{where}{key}'; keys{' in ' + where.rstrip('.') if where else ''} are: "
                f"{', '.join(fields)}"
            )
        nested = fields[key].default_factory if dataclasses.is_dataclass(fields[key].default_factory) else None  # type: ignore[arg-type]
        kwargs[key] = _build(nested, value, f"{where}{key}.") if nested else value
    return cls(**kwargs)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a prepare recipe."""
    return recipe_from_dict(read_yaml(path, "recipe") or {})


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    """A validated recipe from its YAML mapping (as ``Recipe.to_dict`` writes it)."""
    recipe = _build(Recipe, values, "")
    recipe.check()
    return recipe
