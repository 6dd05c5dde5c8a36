"""Shared fixtures and helpers: small real HDF5 datasets written through the production shard writer, the tiny
run settings, and the real processes the tests start, signal and kill (command lines, torchrun, /proc)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml

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


# ---------------------------------------------------------------- runs of the real command line
TINY = [
    "data.crop=[16,16,8]",
    "data.samples_per_epoch=8",
    "model.widths=[4,8,8,16]",
    "train.batch_size=2",
    "train.val_every=1",
    "log.every_steps=1",
    "log.wandb=disabled",
    "data.num_workers=0",
]


def train(tmp_path, dataset, *overrides, check=True):
    args = [
        sys.executable,
        "-m",
        "unet3d_dist.train",
        f"data.dataset={dataset}",
        f"log.runs_dir={tmp_path}",
        *TINY,
        *overrides,
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


WORKERS = "data.num_workers=1"  # loader workers on: stop signals reach them too


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *launcher_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launcher_args]


def trainer(world: int) -> list[str]:
    return (torchrun(world) if world > 1 else [sys.executable]) + ["-m", "unet3d_dist.train"]


def run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"process ended before {path.name} appeared:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def overrides(dataset: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [f"data.dataset={dataset}", f"log.runs_dir={runs}", f"log.run_name={name}", *TINY, *extra]


def final_state(run_dir: Path) -> dict:
    return torch.load(sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["train_state"]["global_step"] == b["train_state"]["global_step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"parameter {name} differs"
    for slot, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][slot]["momentum_buffer"])


# ---------------------------------------------------------------- prepare recipes on the real scans
CT_LIVER = {
    "name": "test-liver",
    "modality": "CT",
    "input": {"layout": "folders", "image": "image*", "label": "labels*"},
    "labels": {"classes": {"background": [0], "liver": [5]}, "unmapped": "background"},
    "preprocessing": {
        "normalization": {"kind": "ct_window", "window": [-200, 250]},
        "spacing": [3, 3, 3],
        "crop": {"to": "foreground", "margin_mm": 9},
    },
    "splits": {"train": 1.0, "val": 0.0, "test": 0.0},
}


def recipe(tmp_path: Path, base: dict = CT_LIVER, **sections) -> Path:
    """A recipe file: ``base`` with whole sections or single keys (``preprocessing__spacing=[...]``) replaced."""
    values = json.loads(json.dumps(base))
    for key, value in sections.items():
        section, _, sub = key.partition("__")
        if sub:
            values[section][sub] = value
        else:
            values[section] = value
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def small_cases(tmp_path: Path, count: int) -> Path:
    cases = tmp_path / "cases"
    for i in range(count):
        (cases / f"case{i}").mkdir(parents=True)
        for name in ("image.nii.gz", "labels.nii.gz"):
            os.symlink(SHARED_DATA / "ct_abdomen" / name, cases / f"case{i}" / name)
    return cases


def assert_lock_free(folder: Path) -> None:
    """No live process holds ``folder``'s run.lock (it may remain as a file: the kernel drops a dead holder's lock)."""
    lock = folder / "run.lock"
    if not lock.exists():
        return
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if another process holds it
    finally:
        os.close(fd)


def two_fake_nodes(nnodes: str) -> dict[str, str]:
    """The environment of launch/multinode.sh for two nodes of one rank each on this machine (c10d on 127.0.0.1)."""
    endpoint = f"127.0.0.1:{free_port()}"
    return {**os.environ, "NNODES": nnodes, "NPROC": "1", "RDZV_ENDPOINT": endpoint, "PYTHON": sys.executable}


def start_nodes(command: list[str], env: dict[str, str], other_log: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Start ``command`` as two nodes: the first hosts the rendezvous store and prints to a pipe; the second only
    joins the store (``is_host=0``, so which starts first does not matter) and prints to ``other_log``."""

    def node(is_host: int, out: Any) -> subprocess.Popen:
        conf = ",".join(filter(None, [env.get("RDZV_CONF"), f"is_host={is_host}"]))
        return subprocess.Popen(
            command,
            env={**env, "RDZV_CONF": conf},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    with open(other_log, "w") as log:
        return node(1, subprocess.PIPE), node(0, log)
