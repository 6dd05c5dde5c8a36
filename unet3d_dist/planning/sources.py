"""What planning reads: the base recipe (what the scans cannot say) and every case, for the fingerprint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ..config import ConfigError
from ..data.shards import DatasetError
from ..logger import progress_bar
from ..optional import sitk
from ..preparation.cases import crop_box, read_case
from ..preparation.layouts import Source, find_cases
from ..preparation.preprocess import CANONICAL_ORIENTATION, reorient
from ..preparation.readers import CaseError, array_xyz
from ..preparation.recipe import CropSpec, PreprocessSpec, Recipe, load_recipe, recipe_from_dict
from . import rules
from .fingerprint import case_fingerprint, pool


def base_recipe(inputs: list[Path], recipe_path: Path | None, modality: str | None) -> Recipe:
    """The layout, channels, class map, name and modality: from ``recipe_path``, else from the first input's
    Decathlon ``dataset.json``; ``modality`` replaces the recipe's."""
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
    else:
        described = inputs[0] / "dataset.json"
        if not described.is_file():
            raise ConfigError(
                f"{inputs[0]} has no dataset.json, so give a base recipe with --recipe: its input and labels "
                "sections say how to find the cases and which label values are which class"
            )
        recipe = recipe_from_dict(decathlon_recipe(json.loads(described.read_text())))
    if modality:
        recipe.modality = modality
    return recipe


def decathlon_recipe(described: dict[str, Any]) -> dict[str, Any]:
    """A base recipe from a Decathlon or nnU-Net v2 ``dataset.json``: its name, labels, channels and modality."""
    labels = described.get("labels", {})
    if all(str(key).isdigit() for key in labels):  # Decathlon: {"0": "background", "1": "liver"}
        pairs = [(name, int(value)) for value, name in labels.items()]
    else:  # nnU-Net v2: {"background": 0, "liver": 1}
        pairs = [(name, int(value)) for name, value in labels.items()]
    classes = {name: [value] for name, value in sorted(pairs, key=lambda pair: pair[1])}
    modalities = described.get("modality") or described.get("channel_names") or {"0": "image"}
    names = [str(modalities[key]) for key in sorted(modalities, key=int)]
    return {
        "name": str(described.get("name") or "dataset"),
        "modality": names[0],
        "input": {"layout": "decathlon", "channels": None if len(names) == 1 else [n.lower() for n in names]},
        "labels": {"classes": classes},
    }


def planned_case(
    source: Source, recipe: Recipe, planned: PreprocessSpec
) -> tuple[list[np.ndarray], np.ndarray, tuple[float, ...], str]:
    """A case read as prepare reads it, in the ``planned`` orientation and inside the box that the planned crop keeps,
    at the case's own spacing (the fingerprint chooses the target): its channels, class-index label, spacing, and the
    orientation the scan was stored in."""
    channels, label = read_case(source, recipe)
    stored = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(channels[0].GetDirection())
    oriented, label = [reorient(c, planned.orientation) for c in channels], reorient(label, planned.orientation)
    box = crop_box(planned, channels[0], label, oriented[0])
    if box is not None:
        oriented, label = [c[box] for c in oriented], label[box]
    return [array_xyz(c) for c in oriented], array_xyz(label), oriented[0].GetSpacing(), stored


def fingerprint_of(inputs: list[Path], recipe: Recipe, console: Console) -> dict[str, Any]:
    """The pooled fingerprint of every readable case; an unreadable one is left out with its reason."""
    spec = recipe.input
    sources = find_cases(inputs, spec.layout, spec.image_patterns, spec.label)
    classes, rng, entries = list(recipe.labels.classes), np.random.default_rng(0), {}
    planned = PreprocessSpec(orientation=CANONICAL_ORIENTATION, crop=CropSpec(**rules.body_crop(recipe.modality).value))
    with progress_bar(console) as progress:
        task = progress.add_task("fingerprint", total=len(sources), now="")
        for source in sources:
            try:
                channels, label, spacing, stored = planned_case(source, recipe, planned)
            except CaseError as err:
                progress.console.print(f"[red]left out[/] {source.id}: {err}")
            else:
                entries[source.id] = case_fingerprint(channels, label, spacing, stored, len(classes), rng)
            progress.update(task, advance=1, now=source.id)
    if not entries:
        raise DatasetError(f"no case under {', '.join(map(str, inputs))} could be read")
    return pool(entries, classes, spec.names)
