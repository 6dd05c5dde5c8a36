"""Real multi-process runs: torchrun with gloo on CPU, tiny model and crops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train import TINY

HELPERS = Path(__file__).parent / "helpers"


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
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


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


def test_two_ranks_hold_identical_weights_and_disjoint_samples(tmp_path, tiny_dataset):
    report = tmp_path / "report.json"
    cmd = torchrun(2) + [str(HELPERS / "ddp_agreement.py"), str(report)]
    result = run(cmd + overrides(tiny_dataset, tmp_path, "ddp", "train.epochs=2", "data.samples_per_epoch=16"))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    assert data["world_size"] == 2 and data["exit_code"] == 0
    assert data["identical"], data["max_difference"]
    rank0, rank1 = ({tuple(k) for k in keys} for keys in data["keys"])
    assert not rank0 & rank1 and {i for _, i in rank0 | rank1} == set(range(16))


@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_then_restart_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, tiny_dataset, world):
    extra = ("train.epochs=4", "data.samples_per_epoch=24", "checkpoint.every_steps=5", "checkpoint.keep_last=10")
    steps = 4 * 24 // (2 * world)
    reference = run(trainer(world) + overrides(tiny_dataset, tmp_path, "reference", *extra))
    assert reference.returncode == 0, reference.stdout + reference.stderr

    command = trainer(world) + overrides(tiny_dataset, tmp_path, "killed", *extra)
    ckpts = tmp_path / "killed" / "checkpoints"
    process = start(command)
    wait_for(ckpts / "ckpt-00000005.pt", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (ckpts / f"ckpt-{steps:08d}.pt").exists(), "the run finished before it could be killed"
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at epoch" in resumed.stdout
    assert_bitwise_equal(final_state(tmp_path / "reference"), final_state(tmp_path / "killed"))


@pytest.mark.parametrize("world", [1, 2])
def test_sigterm_checkpoints_and_leaves_the_requeue_marker_then_resumes(tmp_path, tiny_dataset, world):
    command = trainer(world) + overrides(tiny_dataset, tmp_path, "term", "train.epochs=12", "checkpoint.every_steps=3")
    process = start(command)
    wait_for(tmp_path / "term" / "checkpoints" / "ckpt-00000003.pt", process)
    process.send_signal(signal.SIGTERM)  # to the launcher (torchrun) or to the single process
    output, _ = process.communicate(timeout=600)
    marker = json.loads((tmp_path / "term" / "stopped_by_signal.json").read_text())
    assert marker["signal"] == "SIGTERM" and marker["exit_code"] == 75
    assert (tmp_path / "term" / "checkpoints" / f"ckpt-{marker['step']:08d}.pt").exists()
    if world == 1:
        assert process.returncode == 75, output
    assert "stopped by SIGTERM" in output
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed at epoch" in resumed.stdout and f"step {marker['step']}" in resumed.stdout
    assert not (tmp_path / "term" / "stopped_by_signal.json").exists()
    assert final_state(tmp_path / "term")["train_state"]["global_step"] == 12 * 8 // (2 * world)


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_finishes(tmp_path, tiny_dataset):
    command = torchrun(2, "--max-restarts=1") + ["-m", "unet3d_dist.train"]
    command += overrides(tiny_dataset, tmp_path, "restart", "train.epochs=10", "checkpoint.every_steps=3")
    process = start(command)
    wait_for(tmp_path / "restart" / "checkpoints" / "ckpt-00000003.pt", process)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert "resumed at epoch" in output
    assert final_state(tmp_path / "restart")["train_state"]["global_step"] == 10 * 8 // 4


def test_two_node_rendezvous_on_localhost(tmp_path, tiny_dataset):
    endpoint = f"127.0.0.1:{free_port()}"
    report = tmp_path / "report.json"
    nodes = [
        start(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
             f"--rdzv_endpoint={endpoint}", "--rdzv_id=two-node-test", str(HELPERS / "ddp_agreement.py"), str(report)]
            + overrides(tiny_dataset, tmp_path, "nodes", "train.epochs=2")
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    data = json.loads(report.read_text())
    assert data["world_size"] == 2 and data["identical"]
    assert final_state(tmp_path / "nodes")["train_state"]["global_step"] == 2 * 8 // 4


def test_resume_with_an_incompatible_model_is_refused_with_the_differences(tmp_path, tiny_dataset):
    first = run(trainer(1) + overrides(tiny_dataset, tmp_path, "shape", "train.epochs=1"))
    assert first.returncode == 0, first.stderr
    second = run(trainer(1) + overrides(tiny_dataset, tmp_path, "shape", "train.epochs=2", "model.widths=[8,8,16,16]", "model.norm=batch"))
    assert second.returncode == 2
    assert "the configuration is incompatible" in second.stderr
    assert "model.widths: [4, 8, 8, 16] -> [8, 8, 16, 16]" in second.stderr
    assert "model.norm: 'group' -> 'batch'" in second.stderr
