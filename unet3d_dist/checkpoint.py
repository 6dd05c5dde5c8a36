"""Checkpoints: the one place that knows what they hold, how they are written, read, checked and used.

A checkpoint is a dict of plain state dicts (no ``module.`` or ``_orig_mod.`` prefixes) and Python scalars, loaded
with ``weights_only=True``:

- for inference (evaluate, predict): ``model``, ``config`` (the resolved Config as a dict) and ``dataset`` (the
  training data's classes, modality and preprocessing, which predict repeats on new scans);
- to resume training exactly, also ``optimizer``, ``scheduler``, ``scaler`` and the ``precision`` it belongs to,
  ``train_state`` (epoch, step within the epoch, global step, best Dice, non-finite steps in a row, world size),
  ``rng`` (every rank's generators, its own GPU's included) and ``run_id``.

Files are written under a temporary name in the same folder, fsynced and renamed, so ``ckpt-<step>.pt`` either
exists complete or not at all.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .config import Config, ConfigError, config_from_dict
from .data.shards import ShardedDataset, channel_names
from .files import atomic_write_bytes, remove_unfinished, why_missing
from .model import build_model, to_channels_last
from .precision import amp_name

PATTERN = re.compile(r"^ckpt-(\d{8})\.pt$")
BEST = "best.pt"


INFERENCE_KEYS = ("model", "config", "dataset")
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "train_state", "rng", "run_id")
INCOMPATIBLE_SECTIONS = ("model",)  # config sections a resumed run must keep: they shape the weights


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or does not fit the current run."""


def dataset_entry(dataset: ShardedDataset) -> dict[str, Any]:
    """What a checkpoint records of its training data: classes, modality, the preprocessing predict repeats and the
    raw intensity range it warns against (None for datasets prepared before it was recorded)."""
    return {
        "classes": dataset.classes,
        "modality": dataset.manifest.get("modality", ""),
        "preprocessing": dataset.manifest.get("preprocessing", {}),
        "intensity_range": dataset.manifest.get("intensity_range"),
    }


def inference_checkpoint(model: nn.Module, cfg: Config, dataset: dict[str, Any]) -> dict[str, Any]:
    """What evaluate and predict need: the weights, the resolved config and the training data's ``dataset_entry``."""
    return {"model": model.state_dict(), "config": cfg.to_dict(), "dataset": dataset}


class Trainable(Protocol):
    """What a training checkpoint is built from and restored into (a TrainStep)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None


def training_checkpoint(
    step: Trainable,
    train_state: dict[str, Any],
    rngs: list[dict[str, Any]],
    cfg: Config,
    dataset: dict[str, Any],
    run_id: str,
) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly where this one is."""
    return {
        **inference_checkpoint(step.model, cfg, dataset),
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(),
        "scaler": step.scaler.state_dict(),
        "precision": amp_name(step.amp_dtype),
        "train_state": train_state,
        "rng": rngs,
        "run_id": run_id,
    }


def restore_training(
    checkpoint: dict[str, Any], step: Trainable
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """Load the weights and optimizer, schedule and scaler states into ``step``; return the train state, every
    rank's RNGs and notes on what could not be restored as it was.

    The GradScaler's state belongs to its precision: a checkpoint of another precision (or one whose scaler was
    disabled, as before every precision had one) leaves the scaler as it starts.
    """
    step.model.load_state_dict(checkpoint["model"])
    step.optimizer.load_state_dict(checkpoint["optimizer"])
    step.scheduler.load_state_dict(checkpoint["scheduler"])
    saved, now = checkpoint.get("precision"), amp_name(step.amp_dtype)
    notes = []
    if saved == now and checkpoint["scaler"]:
        step.scaler.load_state_dict(checkpoint["scaler"])
    elif saved != now:
        notes.append(f"precision: {saved or 'unrecorded'} -> {now}; the loss scaler starts afresh")
    return checkpoint["train_state"], checkpoint["rng"], notes


def read_checkpoint(path: Path, resume: bool = False) -> tuple[dict[str, Any], Config]:
    """A checkpoint with every entry that inference (or, with ``resume``, training) needs, and its Config."""
    checkpoint = load_checkpoint(path)
    missing = [key for key in INFERENCE_KEYS + (RESUME_KEYS if resume else ()) if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no {', '.join(missing)} entry: it was not written by unet3d-train"
        )
    try:
        return checkpoint, config_from_dict(checkpoint["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot use: {err}") from None


def inference_model(checkpoint: dict[str, Any], cfg: Config, device: torch.device) -> nn.Module:
    """The checkpoint's model on ``device``, in eval mode and the memory format it was trained in."""
    channels = len(preprocessing_channels(checkpoint["dataset"]))
    model = build_model(cfg.model, in_channels=channels, num_classes=len(checkpoint["dataset"]["classes"]))
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    return to_channels_last(model) if cfg.train.channels_last == "on" else model  # resolved when it trained


def run_dir_of(checkpoint: Path) -> Path:
    """``runs/<name>`` for ``runs/<name>/checkpoints/<file>``; the file's own folder otherwise."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator this rank uses, in weights_only-loadable form: its own GPU's only, not every visible
    one, so a checkpoint restores on a node that shows its ranks fewer GPUs (8 per node, then 4)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {k: np.asarray(v).tolist() for k, v in np_state["state"].items()}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {k: np.asarray(v, dtype=np.uint32) if k == "key" else v for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written before: every visible GPU's; this rank's is the one at its index
        cuda = cuda[device.index] if device.type == "cuda" and device.index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def seed_rngs(seed: int, step: int, rank: int) -> None:
    """Seed every random generator of a rank that the checkpoint's run did not have, from (seed, step, rank)."""
    derived = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)  # the GPUs' too


class Checkpointer:
    """Owns the checkpoint files of one run directory."""

    def __init__(self, run_dir: Path, keep_last: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], step: int, is_best: bool = False) -> tuple[Path, float]:
        """Write ``ckpt-<step>.pt`` (and ``best.pt``), prune old ones; return the path and seconds taken."""
        self.dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        path = self.dir / f"ckpt-{step:08d}.pt"
        data = io.BytesIO()  # in memory first: its size is known, and a full disk is an OSError, not torch's own
        torch.save(state, data)
        atomic_write_bytes(path, data.getbuffer())
        if is_best:
            atomic_write_bytes(self.dir / BEST, data.getbuffer())
        for old in self.complete()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path, time.perf_counter() - start

    def remove_unfinished(self) -> None:
        """Delete what writers killed mid-write left (called by the run directory's holder)."""
        remove_unfinished(self.dir)

    def complete(self) -> list[Path]:
        """Complete step checkpoints, oldest first (temporary files never match the pattern)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if PATTERN.match(p.name))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} {why_missing(path)}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False, which would run the file's code
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it holds objects other than tensors and plain values, so unet3d-train "
            "did not write it, and it is not unpickled since that could run code"
        ) from None
    except Exception as err:  # torch raises several types for damaged files
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None


def config_differences(
    saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]], sections: tuple[str, ...]
) -> list[str]:
    """Lines ``section.key: saved -> current`` for every differing key of the given sections."""
    lines = []
    for section in sections:
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                lines.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return lines


def resume_changes(
    path: Path, checkpoint: dict[str, Any], saved: Config, cfg: Config, dataset: dict[str, Any]
) -> list[str]:
    """The settings a resume from ``path`` changes (``section.key: old -> new``), or CheckpointError listing every
    difference that would not fit the saved weights: the model section and the data's classes and channels."""
    differences = config_differences(saved.to_dict(), cfg.to_dict(), INCOMPATIBLE_SECTIONS)
    old, new = checkpoint["dataset"], dataset
    for name, was, now in (
        ("classes", old["classes"], new["classes"]),
        ("channels", preprocessing_channels(old), preprocessing_channels(new)),
    ):
        if was != now:
            differences.append(f"dataset {name}: {was} -> {now}")
    if differences:
        raise CheckpointError(
            f"cannot resume from {path}: the configuration is incompatible:\n  "
            + "\n  ".join(differences)
            + "\nuse the original settings, another log.run_name, or train.resume=never"
        )
    sections = tuple(name for name in checkpoint["config"] if name not in INCOMPATIBLE_SECTIONS)
    return config_differences(saved.to_dict(), cfg.to_dict(), sections)


def preprocessing_channels(entry: dict[str, Any]) -> list[str]:
    """The image channels a ``dataset_entry`` records."""
    return channel_names(entry.get("preprocessing", {}))
