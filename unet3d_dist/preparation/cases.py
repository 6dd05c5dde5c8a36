"""One source case in, one ``Case`` ready for the shard writer out: read, check, map labels, transform, crop.

Bad input raises ``CaseError`` with one sentence naming the file; doubtful input (an empty label) and a case that
default-sized training crops will pad come back as warnings. Each call is independent, so ``prepare`` runs it in a
separate process per case. Plan's fingerprint reads and crops its cases with the same ``read_case`` and ``crop_box``,
so that it measures what prepare will train on.
"""

from __future__ import annotations

import numpy as np

from ..data.shards import Case
from ..optional import sitk
from .layouts import Source
from .preprocess import (
    bounding_box,
    intensity_percentiles,
    map_labels,
    model_input,
    onto_grid,
    reorient,
)
from .readers import array_xyz, check_voxels, read_hdf5_pair, read_pair
from .recipe import PreprocessSpec, Recipe


def geometry(image: sitk.Image) -> dict[str, list]:
    """Size, spacing, origin and direction: enough to put a prediction back on this image's grid."""
    return {
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def crop_box(spec: PreprocessSpec, image: sitk.Image, label: sitk.Image, grid: sitk.Image) -> tuple[slice, ...] | None:
    """The box of ``grid`` that ``spec.crop`` keeps, or None (no crop, or nothing to crop to): around the labelled
    voxels of ``label`` (on ``grid``), or around the voxels of the raw ``image`` above the body threshold, moved onto
    ``grid`` as a label is; widened by the margin in whole voxels of ``grid``. Prepare crops its resampled case with
    it, and plan's fingerprint measures each case inside it on the case's own grid."""
    crop = spec.crop
    if crop.to == "none":
        return None
    keep = label if crop.to == "foreground" else onto_grid(reorient(image > crop.threshold, spec.orientation), grid)
    return bounding_box(array_xyz(keep) > 0, grid.GetSpacing(), crop.margin_mm)


def read_case(source: Source, recipe: Recipe) -> tuple[list[sitk.Image], sitk.Image]:
    """A case's image channels, checked, and its label as class indices on their grid, both as stored; raises
    CaseError for input that cannot be used. Prepare and plan's fingerprint both read through here, so plan measures
    the cases prepare keeps, as prepare sees them."""
    if source.layout == "hdf5":
        image, label = read_hdf5_pair(source.image, tuple(recipe.input.spacing))
        check_voxels(image, source.image)
        channels = [image]
    else:
        channels, label = read_pair(source.images, source.label, recipe.input.names)
    mapped = sitk.GetImageFromArray(
        map_labels(sitk.GetArrayViewFromImage(label), recipe.labels.classes, recipe.labels.unmapped, source.label)
    )
    mapped.CopyInformation(label)
    return channels, mapped


def prepare_case(source: Source, recipe: Recipe, split: str) -> tuple[Case, list[str]]:
    """The prepared case and its warnings; raises CaseError for input that cannot be used."""
    channels, mapped = read_case(source, recipe)
    image = channels[0]
    spec = recipe.preprocessing
    prepared_channels = model_input(channels, recipe.manifest_preprocessing())
    prepared = prepared_channels[0]
    prepared_label = onto_grid(reorient(mapped, spec.orientation), prepared)
    warnings = []
    if not sitk.GetArrayViewFromImage(prepared_label).any():
        warnings.append(
            f"label {source.label} has no voxel of {', '.join(list(recipe.labels.classes)[1:])}: kept as an "
            "all-background case"
        )
    box = crop_box(spec, image, prepared_label, prepared)
    if box is not None:
        prepared_channels, prepared_label = [c[box] for c in prepared_channels], prepared_label[box]
        prepared = prepared_channels[0]
    elif spec.crop.to != "none":
        warnings.append(f"{source.image}: nothing to crop to ({spec.crop.to}), the whole volume is kept")
    case = Case(
        id=source.id,
        image=np.stack([array_xyz(c) for c in prepared_channels]),
        label=array_xyz(prepared_label),
        spacing=prepared.GetSpacing(),
        origin=prepared.GetOrigin(),
        direction=prepared.GetDirection(),
        split=split,
        source=str(source.image.resolve()),
        extra={
            "label_source": str(source.label.resolve()),
            "source_geometry": geometry(image),
            "intensity_percentiles": [intensity_percentiles(sitk.GetArrayViewFromImage(c)) for c in channels],
            **({"channel_sources": [str(p.resolve()) for p in source.images]} if len(source.images) > 1 else {}),
        },
    )
    return case, warnings
