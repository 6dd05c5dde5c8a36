"""Shared fixtures: small real HDF5 datasets written through the production shard writer."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from unet3d_dist.data.shards import Case, write_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("UNET3D_SHARED_DATA", REPO.parent / "shared" / "data"))


def box_case(case_id: str, shape: tuple[int, int, int], box: tuple[slice, ...] | None, split: str, seed: int) -> Case:
    """A noisy volume whose foreground is a bright box; ``box=None`` gives an empty label."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    if box is not None:
        label[box] = 1
    image = (label * 2.0 + rng.normal(0, 0.3, shape)).astype(np.float32)
    return Case(case_id, image, label, spacing=(1.5, 1.0, 2.5), origin=(10.0, -5.0, 3.0), split=split)


def flip_byte_in_chunk(shard: Path, case_id: str, name: str, chunk: int = 0) -> tuple[int, ...]:
    """Flip one byte in the middle of a stored chunk, as a failing disk or copy would, and return the chunk's offset."""
    with h5py.File(shard, "r") as h5:
        info = h5[case_id][name].id.get_chunk_info(chunk)
    with open(shard, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte ^ 0xFF]))
    return info.chunk_offset


def tiny_cases() -> list[Case]:
    """Six small cases: one smaller than typical crops, one without foreground."""
    return [
        box_case("a", (40, 36, 28), np.s_[10:20, 8:18, 5:15], "train", 1),
        box_case("b", (44, 40, 24), np.s_[20:30, 20:30, 10:20], "train", 2),
        box_case("c", (20, 18, 12), np.s_[5:10, 5:10, 3:8], "train", 3),
        box_case("d", (36, 36, 32), None, "train", 4),
        box_case("e", (40, 40, 24), np.s_[12:24, 10:22, 6:14], "val", 5),
        box_case("f", (32, 40, 28), np.s_[4:14, 20:34, 8:20], "test", 6),
    ]


def write_tiny(root: Path, checksums: bool = True) -> Path:
    """The six tiny cases in two shards; ``checksums=False`` writes them as datasets prepared before checksums were."""
    preprocessing = {"normalization": {"kind": "none"}}
    write_dataset(
        root,
        tiny_cases(),
        ["background", "box"],
        name="tiny",
        modality="CT",
        preprocessing=preprocessing,
        cases_per_shard=4,
        checksums=checksums,
    )
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The six tiny cases in two shards, with chunk checksums."""
    return write_tiny(tmp_path_factory.mktemp("tiny") / "dataset")


@pytest.fixture(scope="session")
def unchecksummed_dataset(tmp_path_factory) -> Path:
    """The six tiny cases as a dataset prepared before chunks carried checksums."""
    return write_tiny(tmp_path_factory.mktemp("old") / "dataset", checksums=False)


def process_tree() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    return children


def direct_children(pid: int) -> list[int]:
    return sorted(process_tree().get(pid, []))


def job_processes(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first: a launcher, its ranks (torchrun starts each in a session of
    its own) and their loader workers, as Slurm's scancel signals them."""
    children, found, todo = process_tree(), [], [pid]
    while todo:
        found.append(todo.pop(0))
        todo.extend(sorted(children.get(found[-1], [])))
    return found


def alive(pids: list[int]) -> list[int]:
    """The ones among ``pids`` still running (zombies, dead but not yet reaped, do not count)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            running.append(pid)
    return running


def signal_job(pid: int, signum: int) -> list[int]:
    """Send ``signum`` to every process of the job started as ``pid``; return their pids."""
    pids = job_processes(pid)
    for target in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signum)
    return pids


def wait_until_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while alive(pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {alive(pids)} still run {timeout} s after their job was killed")
        time.sleep(0.05)
