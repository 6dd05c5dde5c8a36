"""From a fingerprint and this machine to a plan: the prepare recipe, the training config and the reasons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config, load_config
from ..model import build_model, count_parameters, forward_flops
from ..preparation.preprocess import CANONICAL_ORIENTATION
from ..preparation.recipe import Recipe, recipe_from_dict
from . import budget, cluster, measure, rules
from .rules import Choice

EPOCHS = 20  # the planned steps are cut into this many epochs, validated every VAL_EVERY
VAL_EVERY = 4


@dataclass
class Plan:
    recipe: dict[str, Any]
    train: dict[str, dict[str, Any]]
    choices: list[Choice]
    cluster: list[list[str]]
    cluster_step: str  # where the cluster rows' step time comes from
    runs: int  # 1: train one model on every case; more: crossval with this many folds, then their ensemble


def reference_config() -> Config:
    """The reference step's config: budget.REFERENCE_CROP in batches of budget.REFERENCE_BATCH, default network."""
    return load_config(
        None,
        [
            f"data.crop={list(budget.REFERENCE_CROP)}",
            f"train.batch_size={budget.REFERENCE_BATCH}",
            f"model.deep_supervision={rules.deep_supervision().value}",
        ],
    )


def memory_bound_voxels(
    recipe: Recipe, device: torch.device, memory_gb: float | None, time_voxels: float, time_reason: str
) -> tuple[float, Choice]:
    """The most voxels a crop may hold: what the time affords, unless memory (measured bytes per voxel) binds."""
    cfg = reference_config()
    in_channels, num_classes = len(recipe.input.names), len(recipe.labels.classes)
    available, where = measure.memory_budget_bytes(device, memory_gb)
    per_voxel = measure.saved_bytes_per_voxel(cfg, in_channels, num_classes, device) * measure.MEMORY_OVERHEAD
    by_memory = available / (cfg.train.batch_size * per_voxel)
    voxels = min(by_memory, time_voxels)
    memory = f"memory ({where}) allows {by_memory / 1e3:.0f} k at {per_voxel:.0f} B per voxel measured"
    reason = f"memory binds: {memory}" if by_memory < time_voxels else f"time: {time_reason}; {memory}"
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


def step_cost(final_flops: float, in_channels: int, num_classes: int) -> float:
    """A step of ``final_flops`` (forward FLOPs of a whole batch) in reference steps: the ratio to the reference's."""
    reference = reference_config()
    model = build_model(reference.model, in_channels, num_classes)
    return final_flops / (forward_flops(model, budget.REFERENCE_CROP, in_channels) * budget.REFERENCE_BATCH)


def plan_schedule(final: Config, cost: float, spent: budget.Budget, reference_s: float) -> tuple[Choice, int]:
    """The schedule choice (each run's steps, in hundreds) and the crops per epoch that cut them into EPOCHS epochs."""
    batch = final.train.batch_size
    steps = max(100, int(spent.run_steps / cost) // 100 * 100)
    samples = max(batch, steps * batch // EPOCHS)
    runs = "one run" if spent.runs == 1 else f"each of {spent.runs} runs"
    wall = cluster.duration(spent.runs * steps * cost * reference_s / budget.STEP_SHARE)
    schedule = Choice(
        "schedule",
        f"{steps} steps in {runs} ({EPOCHS} epochs of {samples} crops, batch {batch})",
        f"a step of this crop and network costs {cost:.2f} reference steps (forward FLOPs); about {wall} in all",
    )
    return schedule, samples


def make_plan(
    fingerprint: dict[str, Any],
    recipe: Recipe,
    device: torch.device,
    minutes: float,
    memory_gb: float | None,
    spacing_mm: list[float] | None = None,
    step_seconds: float | None = None,
    final_model: budget.Final = "auto",
) -> Plan:
    """The plan for a whole model trained on ``device`` in ``minutes``; ``spacing_mm`` fixes the target spacing,
    ``step_seconds`` is the reference step of the machine that will train when it is not this one."""
    in_channels, num_classes = len(recipe.input.names), len(recipe.labels.classes)
    reference_s = step_seconds or measure.step_seconds(reference_config(), in_channels, num_classes, device)
    where = "given by --step-seconds" if step_seconds else f"measured here on the {device.type}"
    steps, total = budget.reference_steps(minutes, reference_s, where)
    spent = budget.spend(steps, fingerprint["cases"], final_model)
    voxels, crop_budget = memory_bound_voxels(recipe, device, memory_gb, spent.crop_voxels, spent.crop_reason)
    spacing, crop = spacing_and_crop(fingerprint, voxels, spacing_mm)
    normalization = rules.normalization(fingerprint, recipe.modality)
    foreground = rules.foreground_fraction()
    augmentation = rules.augmentation(spacing.value)
    postprocessing = rules.largest_component(fingerprint)
    network = rules.network_depth(crop.value, spacing.value)
    supervision = rules.deep_supervision()
    final = load_config(
        None,
        [f"data.crop={crop.value}", f"model.widths={network.value}", f"model.deep_supervision={supervision.value}"],
    )
    batch = final.train.batch_size
    model = build_model(final.model, in_channels, num_classes)
    flops = forward_flops(model, tuple(crop.value), in_channels)
    cost = step_cost(flops * batch, in_channels, num_classes)
    schedule, samples = plan_schedule(final, cost, spent, reference_s)
    body = rules.body_crop(recipe.modality)
    planned = planned_recipe(recipe, normalization, spacing, body)
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
    if step_seconds or device.type == "cuda":
        gpu_step, source = reference_s * cost, f"the reference step {where}, times this step's cost"
    else:
        gpu_step, source = cluster.predicted_gpu_step(flops, batch), "a GPU step predicted from the FLOPs"
    choices = [total, spent.final, crop_budget, spacing, normalization, body, crop, foreground, *augmentation]
    choices += [network, supervision, schedule, postprocessing]
    rows = cluster.cluster_rows(count_parameters(model), gpu_step, batch, samples * EPOCHS * spent.runs)
    return Plan(planned, train, choices, rows, source, spent.runs)


def planned_recipe(recipe: Recipe, normalization: Choice, spacing: Choice, body: Choice) -> dict[str, Any]:
    """The base recipe with the planned preprocessing. Every case that is not a test case trains: one model on all
    of them, or crossval's folds, which validate on their own held-out cases."""
    splits = recipe.to_dict()["splits"]
    planned = recipe.to_dict() | {
        "preprocessing": {
            "normalization": normalization.value,
            "spacing": spacing.value,
            "interpolation": "linear",
            "orientation": CANONICAL_ORIENTATION,
            "crop": body.value,
        },
        "splits": splits | {"train": round(1.0 - splits["test"], 6), "val": 0.0},
    }
    recipe_from_dict(planned)  # the planned recipe must pass prepare's own checks
    return planned
