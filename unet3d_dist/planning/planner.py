"""From a fingerprint and this machine to a plan: the prepare recipe, the training config and the reasons."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config, load_config
from ..model import build_model, count_parameters, forward_flops
from ..preparation.preprocess import CANONICAL_ORIENTATION
from ..preparation.recipe import Recipe, recipe_from_dict
from . import cluster, measure, rules
from .rules import Choice

# Fewer steps than this and the crop shrinks instead: the hand-written left-atrium recipe lost 0.10 Dice at 600 of its
# 2,000 steps, and gained nothing from 2.25x larger crops at 1,600 (docs/RESULTS.md).
MIN_STEPS = 2000
EPOCHS = 20  # the planned steps are cut into this many epochs, validated every VAL_EVERY
VAL_EVERY = 4


@dataclass
class Plan:
    recipe: dict[str, Any]
    train: dict[str, dict[str, Any]]
    choices: list[Choice]
    cluster: list[list[str]]


def budget_voxels(
    recipe: Recipe, device: torch.device, minutes: float, memory_gb: float | None
) -> tuple[float, Choice]:
    """The most voxels a crop may hold, by memory (measured bytes per voxel) and by time (MIN_STEPS steps in
    ``minutes`` at the step time measured on a probe crop), and the reason."""
    supervision = f"model.deep_supervision={rules.deep_supervision().value}"
    cfg = load_config(None, [f"data.crop={list(measure.PROBE_CROP)}", supervision])
    in_channels, num_classes = len(recipe.input.names), len(recipe.labels.classes)
    budget, where = measure.memory_budget_bytes(device, memory_gb)
    per_voxel = measure.saved_bytes_per_voxel(cfg, in_channels, num_classes, device) * measure.MEMORY_OVERHEAD
    by_memory = budget / (cfg.train.batch_size * per_voxel)
    probe_s = measure.step_seconds(cfg, in_channels, num_classes, device)
    by_time = minutes * 60 / MIN_STEPS / probe_s * math.prod(measure.PROBE_CROP)
    voxels = min(by_memory, by_time)
    probe = "x".join(map(str, measure.PROBE_CROP))
    reason = (
        f"{'memory' if by_memory < by_time else 'time'} binds. Memory ({where}): {by_memory / 1e3:.0f} k at "
        f"{per_voxel:.0f} B per voxel measured; time: {MIN_STEPS} steps in {minutes:g} min allow "
        f"{by_time / 1e3:.0f} k (a {probe} step took {probe_s * 1e3:.0f} ms here)"
    )
    return voxels, Choice("crop budget", f"{voxels / 1e3:.0f} k voxels", reason)


def spacing_and_crop(
    fingerprint: dict[str, Any], voxels: float, spacing_mm: list[float] | None
) -> tuple[Choice, Choice]:
    """The target spacing (``spacing_mm`` when given), and the crop of ``voxels`` at most that the median scan,
    resampled to it, allows."""
    if spacing_mm:
        spacing = Choice("preprocessing.spacing", list(spacing_mm), "as given (--spacing)")
    else:
        spacing = rules.target_spacing(fingerprint, voxels)
    scale = [m / t for m, t in zip(fingerprint["spacing"]["median"], spacing.value)]
    crop = rules.crop_shape([n * f for n, f in zip(fingerprint["shape"]["median"], scale)], spacing.value, voxels)
    return spacing, crop


def plan_schedule(
    final: Config, in_channels: int, num_classes: int, device: torch.device, minutes: float
) -> tuple[Choice, float, int, int]:
    """The schedule choice, the step seconds measured here for the final crop and network, the steps that fit in
    ``minutes`` (in hundreds) and the crops per epoch that cut them into EPOCHS epochs."""
    batch = final.train.batch_size
    step_s = measure.step_seconds(final, in_channels, num_classes, device)
    steps = max(100, int(minutes * 60 / step_s) // 100 * 100)
    samples = max(batch, steps * batch // EPOCHS)
    schedule = Choice(
        "schedule",
        f"{steps} steps ({EPOCHS} epochs of {samples} crops, batch {batch})",
        f"{minutes:g} min at the {step_s:.2f} s step measured here at this crop",
    )
    return schedule, step_s, steps, samples


def make_plan(
    fingerprint: dict[str, Any],
    recipe: Recipe,
    device: torch.device,
    minutes: float,
    memory_gb: float | None,
    spacing_mm: list[float] | None = None,
) -> Plan:
    """The plan for training on ``device`` in ``minutes`` per run; ``spacing_mm`` fixes the target spacing."""
    voxels, budget = budget_voxels(recipe, device, minutes, memory_gb)
    spacing, crop = spacing_and_crop(fingerprint, voxels, spacing_mm)
    normalization = rules.normalization(fingerprint, recipe.modality)
    foreground = rules.foreground_fraction()
    augmentation = rules.augmentation(spacing.value)
    postprocessing = rules.largest_component(fingerprint)
    network = rules.network_depth(crop.value, spacing.value)
    supervision = rules.deep_supervision()
    in_channels, num_classes = len(recipe.input.names), len(recipe.labels.classes)
    final = load_config(
        None,
        [f"data.crop={crop.value}", f"model.widths={network.value}", f"model.deep_supervision={supervision.value}"],
    )
    batch = final.train.batch_size
    schedule, step_s, steps, samples = plan_schedule(final, in_channels, num_classes, device, minutes)
    model = build_model(final.model, in_channels, num_classes)
    body = rules.body_crop(recipe.modality)
    planned = recipe.to_dict() | {
        "preprocessing": {
            "normalization": normalization.value,
            "spacing": spacing.value,
            "interpolation": "linear",
            "orientation": CANONICAL_ORIENTATION,
            "crop": body.value,
        }
    }
    recipe_from_dict(planned)  # the planned recipe must pass prepare's own checks
    train = {
        "data": {
            "crop": crop.value,
            "foreground_fraction": foreground.value,
            **{c.setting.split(".", 1)[1]: c.value for c in augmentation},
            "spatial_prob": 0.2,
            "samples_per_epoch": samples,
        },
        "model": {"widths": network.value, "deep_supervision": supervision.value},
        "train": {"epochs": EPOCHS, "batch_size": batch, "val_every": VAL_EVERY},
        "inference": {"tta_flips": True, "largest_component": postprocessing.value},
    }
    flops = forward_flops(model, tuple(crop.value), in_channels)
    gpu_step = step_s if device.type == "cuda" else cluster.predicted_gpu_step(flops, batch)
    choices = [budget, spacing, normalization, body, crop, foreground, *augmentation, network, supervision]
    choices += [schedule, postprocessing]
    return Plan(planned, train, choices, cluster.cluster_rows(count_parameters(model), gpu_step, batch, steps))
