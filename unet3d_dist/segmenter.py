"""One segmenter for validation, evaluate, predict and export: one network or an ensemble, and how each sees a volume.

A ``Segmenter`` is built from checkpoints (``from_checkpoints``: each inference setting defaults to what the first
checkpoint recorded, and a flag of ``add_inference_flags`` overrides it) or from the model being trained
(``for_validation``). Each member sees a volume as its training did: at its own spacing, with its own crop as the
sliding-window patch and flips along the axes its training mirrored. One member's logits, or the members' mean
softmax probability, go to the argmax slab by slab along x, so memory never holds the whole volume's logits
(``windows.py``); the largest component of each class is kept when asked. ``segment_scan`` adds what predict needs
around that: the scan prepared like the training data, and the mask put back on the scan's own grid.

Members must segment the same classes from identically normalised scans; only the spacing may differ.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint, CheckpointError, read_checkpoint
from .components import keep_largest_component
from .config import Config, ConfigError, side_divisor
from .inference import resample_to_shape, slabs_onto
from .optional import sitk
from .precision import resolve_amp
from .preparation.preprocess import model_input, onto_grid
from .preparation.readers import array_xyz, image_xyz
from .windows import ensemble_labels


@dataclass(frozen=True)
class Member:
    """One network of a segmenter and how it looks at a volume."""

    model: nn.Module
    patch: tuple[int, int, int]
    tta_axes: tuple[int, ...] = ()  # flip test-time augmentation along these axes (its training's flip axes)
    spacing: tuple[float, float, float] | None = None  # its training data's spacing, where that was resampled
    channels_last: bool = False


@dataclass(frozen=True)
class Settings:
    """How the members run over a volume, the same for all of them."""

    overlap: float = 0.5
    batch_size: int = 4
    amp_dtype: torch.dtype | None = None
    largest_component: bool = False  # keep each class's largest connected component only
    device: torch.device = torch.device("cpu")
    stitch_device: torch.device | None = None  # None: stitch on the inference device; cpu for large CT volumes
    stop_requested: Callable[[], bool] | None = None  # asked before each window batch: a stopping run ends early


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """The inference flags evaluate, predict and export share; each defaults to what the checkpoint recorded."""
    parser.add_argument(
        "--patch", type=int, nargs=3, metavar=("X", "Y", "Z"), help="window size (default: each checkpoint's crop)"
    )
    parser.add_argument(
        "--overlap", type=float, help="overlap of neighbouring windows, in [0, 1) (default: inference.overlap)"
    )
    parser.add_argument("--batch-size", type=int, help="windows per forward pass (default: inference.batch_size)")
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="average the logits over every flip along the axes training mirrored (data.flip_axes; default: "
        "inference.tta_flips)",
    )
    parser.add_argument(
        "--largest-component",
        action=argparse.BooleanOptionalAction,
        help="keep each class's largest connected component (default: inference.largest_component)",
    )
    parser.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16", "off"],
        default="auto",
        help="mixed precision; auto: bf16 on GPUs and CPUs that run it in hardware, fp16 on older GPUs, else off",
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: the local rank's GPU if there is one"
    )
    parser.add_argument(
        "--stitch-device",
        choices=["device", "cpu"],
        default="device",
        help="where window logits are summed; cpu keeps only one batch of windows on the GPU (large CT)",
    )


def read_checkpoints(paths: Sequence[Path]) -> list[Checkpoint]:
    """Every checkpoint of an ensemble, once they are known to agree (one sentence naming two that do not)."""
    loaded = [read_checkpoint(path) for path in paths]
    first = loaded[0]
    for other in loaded[1:]:
        why = disagreement(first, other)
        if why:
            raise CheckpointError(f"checkpoints {first.path} and {other.path} cannot form an ensemble: {why}")
    return loaded


def disagreement(a: Checkpoint, b: Checkpoint) -> str | None:
    """Why two checkpoints cannot be averaged: other classes, or training data prepared otherwise than in spacing."""
    if a.classes != b.classes:
        return f"they segment different classes ({a.classes} and {b.classes})"
    pre_a, pre_b = a.preprocessing, b.preprocessing
    for key in sorted((set(pre_a) | set(pre_b)) - {"spacing"}):
        if pre_a.get(key) != pre_b.get(key):
            values = f"{pre_a.get(key)!r} and {pre_b.get(key)!r}"
            return f"their training data were prepared differently (preprocessing.{key}: {values})"
    return None


def describe(paths: Sequence[Path]) -> str:
    """The checkpoint's path, or ``ensemble of N checkpoints (paths)``: for the console."""
    if len(paths) == 1:
        return str(paths[0])
    return f"ensemble of {len(paths)} checkpoints ({', '.join(map(str, paths))})"


class Segmenter:
    """Class maps of whole volumes from one or more networks (see the module docstring)."""

    def __init__(self, members: list[Member], classes: list[str], settings: Settings, checkpoints: list[Checkpoint]):
        self.members, self.classes, self.settings = members, classes, settings
        self.checkpoints = checkpoints  # empty when built from the model being trained

    @classmethod
    def from_checkpoints(
        cls, checkpoints: list[Checkpoint], device: torch.device, flags: argparse.Namespace | None = None, **extra: Any
    ) -> Segmenter:
        """The checkpoints' networks on ``device``; the inference ``flags`` (``add_inference_flags``) that are set
        override what the first checkpoint recorded, and ``extra`` sets ``Settings`` fields (stop_requested)."""
        flags = flags or argparse.Namespace()
        patch, tta = getattr(flags, "patch", None), getattr(flags, "tta", None)
        check_patch(patch, checkpoints)
        members = [
            Member(
                model=checkpoint.model(device),
                patch=tuple(patch or checkpoint.cfg.data.crop),
                tta_axes=checkpoint.cfg.data.flip_axis_indices if flips else (),
                spacing=checkpoint.spacing,
                channels_last=checkpoint.cfg.train.channels_last == "on",  # resolved when the run trained
            )
            for checkpoint in checkpoints
            for flips in [checkpoint.cfg.inference.tta_flips if tta is None else tta]
        ]
        first = checkpoints[0]
        recorded = {
            "overlap": first.cfg.inference.overlap,
            "batch_size": first.cfg.inference.batch_size,
            "largest_component": first.largest_component,
        }
        chosen = {key: getattr(flags, key, None) for key in recorded}
        if chosen["overlap"] is not None and not 0 <= chosen["overlap"] < 1:
            raise ConfigError(f"--overlap must be in [0, 1), not {chosen['overlap']}")
        settings = Settings(
            **{key: recorded[key] if value is None else value for key, value in chosen.items()},
            amp_dtype=resolve_amp(getattr(flags, "amp", "auto"), device),
            device=device,
            stitch_device=torch.device("cpu") if getattr(flags, "stitch_device", None) == "cpu" else None,
        )
        return cls(members, first.classes, replace(settings, **extra), checkpoints)

    @classmethod
    def for_validation(
        cls, model: nn.Module, cfg: Config, classes: list[str], device: torch.device, **settings: Any
    ) -> Segmenter:
        """The model being trained, looking at volumes as the checkpoints it writes will (``settings``: the rest)."""
        member = Member(model, tuple(cfg.data.crop), cfg.inference_tta_axes, None, cfg.train.channels_last == "on")
        inference = cfg.inference
        chosen = Settings(inference.overlap, inference.batch_size, largest_component=inference.largest_component)
        return cls([member], classes, replace(chosen, device=device, **settings), [])

    def labels(self, volume: np.ndarray, spacing: Sequence[float], pad_values: Sequence[float]) -> np.ndarray:
        """Class map (uint8, X, Y, Z) of a prepared ``volume`` (C, X, Y, Z) with ``spacing`` (mm), whose channels
        are padded with ``pad_values`` where windows reach past it.

        A member trained at another spacing sees the volume resampled to that spacing; its logits are resampled back
        (trilinear) before the softmax, so the scores are those of the volume's own grid. Members on the volume's own
        grid are stitched, averaged and turned into labels slab by slab along x; a resampled member's logits are
        whole.
        """
        image = torch.from_numpy(volume)
        shape = tuple(volume.shape[1:])

        def member_slabs(member: Member) -> Iterator[tuple[int, torch.Tensor]]:
            seen = image
            if member.spacing and any(abs(a - b) > 1e-6 for a, b in zip(spacing, member.spacing)):
                size = [max(1, round(n * s / m)) for n, s, m in zip(shape, spacing, member.spacing)]
                seen = resample_to_shape(image, size)
            options = self.window_options(member, pad_values)
            return slabs_onto(shape, member.model, seen, member.patch, len(self.classes), **options)

        with evaluating(self.members):
            labels = ensemble_labels(shape, [member_slabs(member) for member in self.members], softmax)
        return keep_largest_component(labels) if self.settings.largest_component else labels

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How the (first) member's training scans were prepared, which new scans repeat."""
        first = self.checkpoints[0]
        if "normalization" not in first.preprocessing:
            raise CheckpointError(
                f"checkpoint {first.path}'s dataset records no preprocessing.normalization, so new scans cannot be "
                "prepared like its training data"
            )
        return first.preprocessing

    def prepare(self, channels: list[sitk.Image]) -> list[sitk.Image]:
        """The scan's channels on the grid and scale the (first) network was trained on."""
        return model_input(channels, self.preprocessing)

    def segment_scan(self, channels: list[sitk.Image], prepared: list[sitk.Image] | None = None) -> sitk.Image:
        """Class map (uint8) of a scan, on the scan's own grid; ``prepared`` is ``prepare(channels)`` if at hand."""
        prepared = prepared or self.prepare(channels)
        voxels = np.stack([array_xyz(channel) for channel in prepared])
        labels = self.labels(voxels, prepared[0].GetSpacing(), voxels.reshape(len(voxels), -1).min(1).tolist())
        return onto_grid(image_xyz(labels, like=prepared[0]), channels[0])

    def window_options(self, member: Member, pad_values: Sequence[float]) -> dict[str, Any]:
        settings = self.settings
        return {
            "overlap": settings.overlap,
            "batch_size": settings.batch_size,
            "pad_value": list(pad_values),
            "tta_axes": member.tta_axes,
            "amp_dtype": settings.amp_dtype,
            "device": settings.device,
            "stitch_device": settings.stitch_device,
            "channels_last": member.channels_last,
            "stop_requested": settings.stop_requested,
        }


def softmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(0)


@contextlib.contextmanager
def evaluating(members: list[Member]) -> Iterator[None]:
    """The members' models in eval mode for the block, each back in its own mode afterwards (validation runs on the
    model being trained)."""
    modes = [member.model.training for member in members]
    for member in members:
        member.model.eval()
    try:
        yield
    finally:
        for member, training in zip(members, modes):
            member.model.train(training)


def check_patch(patch: Sequence[int] | None, checkpoints: list[Checkpoint]) -> None:
    """A window size every member's UNet can halve down to its deepest level."""
    if not patch:
        return
    levels = max(len(checkpoint.cfg.model.widths) for checkpoint in checkpoints)
    step = side_divisor(levels)
    if any(side < step or side % step for side in patch):
        raise ConfigError(
            f"--patch must be multiples of {step} (the {levels}-level UNet halves each side {levels - 1} times), "
            f"not {list(patch)}"
        )
