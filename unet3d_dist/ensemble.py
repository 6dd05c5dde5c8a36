"""Several checkpoints as one segmenter (the folds of a cross-validation, say) for evaluate and predict.

Each member sees a volume as its training did: at its own spacing, with its own crop as the sliding-window patch
and its own flip test-time augmentation. Their softmax probabilities, brought back onto one grid, are averaged
before the argmax. Members must segment the same classes from identically normalised scans; only the spacing may
differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError, inference_model, read_checkpoint
from .config import Config
from .inference import labels_from_slabs


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


def mean_probability_slabs(streams: list[Iterable[tuple[int, torch.Tensor]]]) -> Iterator[tuple[int, torch.Tensor]]:
    """The members' softmax probabilities averaged, as ``(x, slab)`` pairs in order along x, from each member's
    ``(x, logits slab)`` pairs (``sliding_window_slabs``, or one whole-volume slab). Slabs of the members are cut
    differently (their patches differ), so each member's probabilities wait until every member reached those planes:
    memory holds one slab per member, not the volume."""
    if not streams:
        raise ValueError("an ensemble needs at least one member")
    members = [iter(stream) for stream in streams]
    pending: list[torch.Tensor] = [torch.empty(0)] * len(members)  # each member's probabilities from plane ``done``
    ends, done = [0] * len(members), 0
    while True:
        for i, member in enumerate(members):
            if ends[i] == done and (item := next(member, None)) is not None:
                x, slab = item  # its planes start at ``done``: the member's earlier ones are all used
                pending[i] = slab.softmax(0)  # a new tensor: the slab itself is only valid until the next one
                ends[i] = x + slab.shape[1]
        stop = min(ends)
        if stop == done:
            return
        total = pending[0][:, : stop - done].clone()
        for more in pending[1:]:
            total.add_(more[:, : stop - done])
        yield done, total.div_(len(members))
        pending = [p[:, stop - done :] for p in pending]
        done = stop


def ensemble_labels(shape: tuple[int, ...], streams: list[Iterable[tuple[int, torch.Tensor]]]) -> np.ndarray:
    """The class map of one or more members' ``(x, logits slab)`` streams: one member's argmax (that of its
    probabilities), or the argmax of the members' mean probability."""
    return labels_from_slabs(shape, streams[0] if len(streams) == 1 else mean_probability_slabs(streams))


def describe(loaded: list[Loaded]) -> str:
    """The checkpoint's path, or ``ensemble of N checkpoints (paths)``: for the console."""
    if len(loaded) == 1:
        return str(loaded[0].path)
    return f"ensemble of {len(loaded)} checkpoints ({', '.join(str(item.path) for item in loaded)})"
