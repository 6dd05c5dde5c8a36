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
from .exit_codes import BadInput
from .files import atomic_write_bytes, remove_unfinished, why_missing
from .model import build_model, to_channels_last
from .precision import amp_name

PATTERN = re.compile(r"^ckpt-(\d{8})\.pt$")
BEST = "best.pt"


INFERENCE_KEYS = ("model", "config", "dataset")
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "train_state", "rng", "run_id")
INCOMPATIBLE_SECTIONS = ("model",)  # config sections a resumed run must keep: they shape the weights


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint that cannot be loaded or does not fit the current run."""


def dataset_entry(dataset: ShardedDataset) -> dict[str, Any]:
    """What a checkpoint records of its training data: classes, modality, the preprocessing predict repeats and the
    raw intensity range it warns against (None for datasets prepared before it was recorded)."""
    return {
        "classes": dataset.classes,
        "modality": dataset.manifest.get("modality", ""),
        "preprocessing": dataset.manifest.get("preprocessing", {}),
        "intensity_range": dataset.manifest.get("intensity_range"),
        "largest_component": dataset.largest_component,  # the manifest's advice, for inference.largest_component=auto
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


class Checkpoint:
    """A checkpoint read from disk, with typed access to what it holds: no other module knows its keys."""

    def __init__(self, path: Path, state: dict[str, Any], cfg: Config):
        self.path, self.state, self.cfg = Path(path), state, cfg

    @property
    def dataset(self) -> dict[str, Any]:
        """Its training data's ``dataset_entry``."""
        return self.state["dataset"]

    @property
    def classes(self) -> list[str]:
        return self.dataset["classes"]

    @property
    def modality(self) -> str:
        return self.dataset.get("modality", "")

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How its training scans were prepared, which predict repeats on new scans (empty for a synthetic set)."""
        return self.dataset.get("preprocessing", {})

    @property
    def channels(self) -> list[str]:
        return preprocessing_channels(self.dataset)

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """The spacing its training data was resampled to, if it was."""
        spacing = self.preprocessing.get("spacing")
        return tuple(spacing) if spacing else None

    @property
    def intensity_range(self) -> dict[str, list[float]] | None:
        """Per channel, the raw 0.5 and 99.5 percentiles of its training scans (None before they were recorded)."""
        return self.dataset.get("intensity_range")

    @property
    def largest_component(self) -> bool:
        """Whether inference keeps each class's largest piece: the recorded setting, or for ``auto`` (a checkpoint
        not written by a training run) the advice of its training data's manifest."""
        setting = self.cfg.inference.largest_component
        return setting if isinstance(setting, bool) else bool(self.dataset.get("largest_component", False))

    @property
    def train_state(self) -> dict[str, Any]:
        return self.state["train_state"]

    @property
    def run_id(self) -> str:
        return self.state["run_id"]

    @property
    def world_size(self) -> int:
        """The ranks that wrote it (older checkpoints record one RNG state per rank instead)."""
        return self.train_state.get("world_size") or len(self.state["rng"])

    def global_batch(self, batch_size: int, configured: int = 0) -> int:
        """The crops per step its run trained with (older checkpoints: their world size x ``batch_size``), which a
        resumed run keeps: a ``configured`` train.global_batch other than that is refused in one sentence."""
        saved = self.train_state.get("global_batch") or self.world_size * batch_size
        if configured and configured != saved:
            raise ConfigError(
                f"train.global_batch={configured}, but the run being resumed trains {saved} crops per step; a "
                "run keeps its global batch (leave train.global_batch at 0, or start a new run)"
            )
        return saved

    def model(self, device: torch.device) -> nn.Module:
        """Its network on ``device``, in eval mode and the memory format it was trained in."""
        model = build_model(self.cfg.model, in_channels=len(self.channels), num_classes=len(self.classes))
        model.load_state_dict(self.state["model"])
        model.to(device).eval()
        return to_channels_last(model) if self.cfg.train.channels_last == "on" else model  # resolved when it trained

    def restore_into(self, step: Trainable) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
        """Load the weights and optimizer, schedule and scaler states into ``step``; return the train state, every
        rank's RNGs and notes on what could not be restored as it was.

        The GradScaler's state belongs to its precision: a checkpoint of another precision (or one whose scaler was
        disabled, as before every precision had one) leaves the scaler as it starts.
        """
        state = self.state
        step.model.load_state_dict(state["model"])
        step.optimizer.load_state_dict(state["optimizer"])
        step.scheduler.load_state_dict(state["scheduler"])
        saved, now = state.get("precision"), amp_name(step.amp_dtype)
        notes = []
        if saved == now and state["scaler"]:
            step.scaler.load_state_dict(state["scaler"])
        elif saved != now:
            notes.append(f"precision: {saved or 'unrecorded'} -> {now}; the loss scaler starts afresh")
        return state["train_state"], state["rng"], notes

    def resume_changes(self, cfg: Config, dataset: dict[str, Any]) -> list[str]:
        """The settings a resume with ``cfg`` on ``dataset`` (its ``dataset_entry``) changes (``section.key: old ->
        new``), or CheckpointError listing every difference that would not fit the saved weights: the model section
        and the data's classes and channels."""
        saved, now = self.cfg.to_dict(), cfg.to_dict()
        differences = config_differences(saved, now, INCOMPATIBLE_SECTIONS)
        for name, was, new in (
            ("classes", self.classes, dataset["classes"]),
            ("channels", self.channels, preprocessing_channels(dataset)),
        ):
            if was != new:
                differences.append(f"dataset {name}: {was} -> {new}")
        if differences:
            raise CheckpointError(
                f"cannot resume from {self.path}: the configuration is incompatible:\n  "
                + "\n  ".join(differences)
                + "\nuse the original settings, another log.run_name, or train.resume=never"
            )
        sections = tuple(name for name in self.state["config"] if name not in INCOMPATIBLE_SECTIONS)
        return config_differences(saved, now, sections)


def read_checkpoint(path: Path, resume: bool = False) -> Checkpoint:
    """A checkpoint with every entry that inference (or, with ``resume``, training) needs, and its Config."""
    state = load_checkpoint(path)
    missing = [key for key in INFERENCE_KEYS + (RESUME_KEYS if resume else ()) if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no {', '.join(missing)} entry: it was not written by unet3d-train"
        )
    try:
        return Checkpoint(Path(path), state, config_from_dict(state["config"]))
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot use: {err}") from None


def run_dir_of(checkpoint: Path) -> Path:
    """``runs/<name>`` for ``runs/<name>/checkpoints/<file>``; the file's own folder otherwise."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def default_output(checkpoints: list[Path], name: str) -> Path:
    """Where evaluate and predict write by default: ``runs/<run>/<name>`` for ``runs/<run>/checkpoints/<file>``
    (beside the file otherwise); for an ensemble ``runs/ensemble-<name>``, beside its first member's run."""
    if len(checkpoints) > 1:
        return run_dir_of(checkpoints[0]).parent / f"ensemble-{name}"
    return run_dir_of(checkpoints[0]) / name


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


def preprocessing_channels(entry: dict[str, Any]) -> list[str]:
    """The image channels a ``dataset_entry`` records."""
    return channel_names(entry.get("preprocessing", {}))
