"""Checkpoint files: atomic save, keep-last-k plus best, and loading only complete files.

A checkpoint is a dict of plain state dicts (no ``module.`` or ``_orig_mod.`` prefixes) and Python scalars, loaded
with ``weights_only=True``. Files are written under a temporary name in the same folder, fsynced and renamed, so
``ckpt-<step>.pt`` either exists complete or not at all.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.shards import atomic_write

PATTERN = re.compile(r"^ckpt-(\d{8})\.pt$")
BEST = "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or does not fit the current run."""


def run_dir_of(checkpoint: Path) -> Path:
    """``runs/<name>`` for ``runs/<name>/checkpoints/<file>``; the file's own folder otherwise."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def rng_state() -> dict[str, Any]:
    """Every random generator of this process, in weights_only-loadable form."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {k: np.asarray(v).tolist() for k, v in np_state["state"].items()}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {k: np.asarray(v, dtype=np.uint32) if k == "key" else v for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        if is_best:
            atomic_write(self.dir / BEST, lambda tmp: shutil.copyfile(path, tmp))
        for old in self.complete()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path, time.perf_counter() - start

    def remove_unfinished(self) -> None:
        """Delete the temporary files of writers that were killed mid-write (called by the run directory's holder)."""
        for leftover in self.dir.glob(".tmp-*") if self.dir.is_dir() else []:
            leftover.unlink(missing_ok=True)

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
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False, which would run the file's code
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it holds objects other than tensors and plain values, so unet3d-train "
            "did not write it, and it is not unpickled since that could run code"
        ) from None
    except Exception as err:  # torch raises several types for damaged files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def config_differences(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]], sections: tuple[str, ...]) -> list[str]:
    """Lines ``section.key: saved -> current`` for every differing key of the given sections."""
    lines = []
    for section in sections:
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                lines.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return lines
