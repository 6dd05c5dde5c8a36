"""Several checkpoints as one segmenter (the folds of a cross-validation, say) for evaluate and predict.

Each member sees a volume as its training did: at its own spacing, with its own crop as the sliding-window patch
and its own flip test-time augmentation. Their softmax probabilities, brought back onto one grid, are averaged
before the argmax. Members must segment the same classes from identically normalised scans; only the spacing may
differ.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, inference_model, read_checkpoint
from .config import Config


@dataclass(frozen=True)
class Member:
    """One network of an ensemble and how it looks at a volume."""

    model: nn.Module
    patch: tuple[int, int, int]
    tta_axes: tuple[int, ...] = ()  # flip test-time augmentation along these axes (its training's flip axes)
    spacing: tuple[float, float, float] | None = None  # its training data's spacing, where that was resampled
    channels_last: bool = False


@dataclass
class Loaded:
    """A checkpoint read from disk, with its Config."""

    path: Path
    checkpoint: dict[str, Any]
    cfg: Config

    @property
    def dataset(self) -> dict[str, Any]:
        return self.checkpoint["dataset"]


def read_checkpoints(paths: list[Path]) -> list[Loaded]:
    """Every checkpoint of an ensemble, once they are known to agree (one sentence naming two that do not)."""
    loaded = [Loaded(path, *read_checkpoint(path)) for path in paths]
    check_agreement(loaded)
    return loaded


def check_agreement(loaded: list[Loaded]) -> None:
    """Members must predict the same classes from scans prepared the same way, apart from the spacing."""
    first = loaded[0]
    for other in loaded[1:]:
        why = disagreement(first.dataset, other.dataset)
        if why:
            raise CheckpointError(f"checkpoints {first.path} and {other.path} cannot form an ensemble: {why}")


def disagreement(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    if a["classes"] != b["classes"]:
        return f"they segment different classes ({a['classes']} and {b['classes']})"
    pre_a, pre_b = a.get("preprocessing", {}), b.get("preprocessing", {})
    for key in sorted((set(pre_a) | set(pre_b)) - {"spacing"}):
        if pre_a.get(key) != pre_b.get(key):
            values = f"{pre_a.get(key)!r} and {pre_b.get(key)!r}"
            return f"their training data were prepared differently (preprocessing.{key}: {values})"
    return None


def build_members(
    loaded: list[Loaded], device: torch.device, patch: tuple[int, int, int] | None = None, tta: bool | None = None
) -> list[Member]:
    """Each checkpoint's model on ``device``; ``patch`` and ``tta`` override every member's own when given."""
    members = []
    for item in loaded:
        cfg = item.cfg
        flips = cfg.inference.tta_flips if tta is None else tta
        spacing = item.dataset.get("preprocessing", {}).get("spacing")
        members.append(
            Member(
                model=inference_model(item.checkpoint, cfg, device),
                patch=tuple(patch or cfg.data.crop),
                tta_axes=cfg.data.flip_axis_indices if flips else (),
                spacing=tuple(spacing) if spacing else None,
                channels_last=cfg.train.channels_last == "on",  # resolved when the run trained
            )
        )
    return members


def mean_probabilities(logit_maps: Iterable[torch.Tensor]) -> torch.Tensor:
    """The members' softmax probabilities (C, X, Y, Z), averaged; the argmax of one member's is that of its logits."""
    total, count = None, 0
    for logits in logit_maps:
        probabilities = logits.softmax(0)
        total = probabilities if total is None else total.add_(probabilities)
        count += 1
    if total is None:
        raise ValueError("an ensemble needs at least one member")
    return total.div_(count)


def describe(loaded: list[Loaded]) -> str:
    """The checkpoint's path, or ``ensemble of N checkpoints (paths)``: for the console."""
    if len(loaded) == 1:
        return str(loaded[0].path)
    return f"ensemble of {len(loaded)} checkpoints ({', '.join(str(item.path) for item in loaded)})"
