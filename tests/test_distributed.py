"""Real multi-process runs: torchrun with gloo on CPU, tiny model and crops."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    REPO,
    WORKERS,
    assert_bitwise_equal,
    assert_lock_free,
    box_case,
    direct_children,
    final_state,
    free_port,
    job_processes,
    overrides,
    run,
    signal_job,
    start,
    start_nodes,
    torchrun,
    trainer,
    two_fake_nodes,
    wait_for,
    wait_until_gone,
)

from unet3d_dist.crop_keys import read_crop_keys
from unet3d_dist.data.shards import write_dataset

HELPERS = Path(__file__).parent / "helpers"


def test_two_ranks_hold_identical_weights_and_disjoint_samples(tmp_path, tiny_dataset):
    report = tmp_path / "report.json"
    cmd = torchrun(2) + [str(HELPERS / "ddp_agreement.py"), str(report)]
    cmd += overrides(tiny_dataset, tmp_path, "ddp", "train.epochs=2", "data.samples_per_epoch=16", WORKERS)
    # Two threads per rank: oneDNN then gives 1x1x1 conv weights gradients with other strides than one thread does.
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Grad strides do not match" not in result.stderr
    data = json.loads(report.read_text())
    assert data["world_size"] == 2 and data["exit_code"] == 0
    assert data["identical"], data["max_difference"]
    rank0, rank1 = ({tuple(k) for k in keys} for keys in data["keys"])
    assert not rank0 & rank1 and {i for _, i in rank0 | rank1} == set(range(16))


def kill_whole_job(process: subprocess.Popen) -> None:
    """SIGKILL the launcher, every rank and every loader worker at once, and wait until none of them runs."""
    pids = signal_job(process.pid, signal.SIGKILL)
    process.wait()
    wait_until_gone(pids, timeout=30)


# One rank augments on the device (rotation, scaling, intensity finished after the workers), two on the CPU.
AUGMENTED_ON_THE_DEVICE = (
    "data.augment_device=device",
    "data.rotate_deg=15",
    "data.scale=0.1",
    "data.spatial_prob=0.5",
    "data.intensity_aug=true",
)


@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_of_the_whole_job_then_restart_ends_bitwise_equal_to_an_uninterrupted_run(
    tmp_path, tiny_dataset, world
):
    extra = (
        "train.epochs=4",
        "data.samples_per_epoch=24",
        "checkpoint.every_steps=5",
        "checkpoint.keep_last=10",
        WORKERS,
        *(AUGMENTED_ON_THE_DEVICE if world == 1 else ()),
    )
    steps = 4 * 24 // (2 * world)
    reference = run(trainer(world) + overrides(tiny_dataset, tmp_path, "reference", *extra))
    assert reference.returncode == 0, reference.stdout + reference.stderr

    command = trainer(world) + overrides(tiny_dataset, tmp_path, "killed", *extra)
    ckpts = tmp_path / "killed" / "checkpoints"
    process = start(command)
    wait_for(ckpts / "ckpt-00000005.pt", process)
    kill_whole_job(process)
    killed_at = final_state(tmp_path / "killed")["train_state"]["global_step"]
    assert killed_at < steps, "the run finished before it could be killed"
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at epoch" in resumed.stdout and f"step {killed_at}" in resumed.stdout
    assert_bitwise_equal(final_state(tmp_path / "reference"), final_state(tmp_path / "killed"))


def send(process: subprocess.Popen, world: int, signum: int, target: str) -> None:
    """What a user, a terminal or Slurm does: one signal to the launcher, the ranks, the loader workers, or to all."""
    if target == "every process":
        signal_job(process.pid, signum)
        return
    ranks = [process.pid] if world == 1 else direct_children(process.pid)
    workers = [w for r in ranks for w in direct_children(r)]
    pids = {"launcher": [process.pid], "ranks": ranks, "one rank": ranks[:1], "loader workers": workers}[target]
    assert pids, f"no {target} to signal"
    for pid in pids:
        os.kill(pid, signum)


STOPS = [  # (signal, world size, who gets it, resume): what scancel, Ctrl-C and the time-limit signal do on each path
    ("SIGTERM", 2, "every process", True),  # scancel, a Slurm time limit or preemption
    ("SIGINT", 1, "every process", True),  # Ctrl-C in a terminal
    ("SIGINT", 2, "launcher", False),  # Ctrl-C to torchrun, which passes it on to each rank's process group
    ("SIGUSR1", 2, "loader workers", False),  # workers alone: they hand the stop to their rank
    ("SIGTERM", 1, "ranks", False),
    ("SIGTERM", 2, "one rank", False),  # the other rank learns it from the stop vote, and both stop after one step
]


@pytest.mark.parametrize("name, world, target, resume", STOPS)
def test_a_stop_signal_checkpoints_leaves_the_marker_and_the_same_command_resumes(
    tmp_path, tiny_dataset, name, world, target, resume
):
    signum = getattr(signal, name)
    command = trainer(world) + overrides(
        tiny_dataset, tmp_path, "term", "train.epochs=12", "checkpoint.every_steps=3", "train.val_every=4", WORKERS
    )
    process = start(command)
    wait_for(tmp_path / "term" / "checkpoints" / "ckpt-00000003.pt", process)
    send(process, world, signum, target)
    output, _ = process.communicate(timeout=600)
    marker = json.loads((tmp_path / "term" / "stopped_by_signal.json").read_text())
    assert marker["signal"] == name and marker["exit_code"] == 75, output
    assert (tmp_path / "term" / "checkpoints" / f"ckpt-{marker['step']:08d}.pt").exists()
    assert f"stopped by {name}" in output and "DataLoader worker" not in output, output
    if world == 1:
        assert process.returncode == 75 and "Traceback" not in output, output
    else:  # a signalled torchrun exits with a traceback of its own; the ranks' errors would be marked [rank<n>]
        assert "[rank" not in output, output
    if not resume:  # the resume after a stop is the same in every case; two of them check it
        return
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at epoch" in resumed.stdout and f"step {marker['step']}" in resumed.stdout
    assert not (tmp_path / "term" / "stopped_by_signal.json").exists()
    assert final_state(tmp_path / "term")["train_state"]["global_step"] == 12 * 8 // (2 * world)


def test_a_stop_during_validation_checkpoints_the_epoch_and_the_resumed_run_validates_it(tmp_path):
    dataset = tmp_path / "dataset"  # a validation volume of hundreds of windows, so the stop lands inside it
    cases = [
        box_case("a", (40, 36, 28), np.s_[10:20, 8:18, 5:15], "train", 1),
        box_case("v", (64, 64, 48), np.s_[20:40, 20:40, 10:30], "val", 2),
    ]
    write_dataset(dataset, cases, ["background", "box"], name="val", modality="CT", preprocessing={})
    command = trainer(1) + overrides(dataset, tmp_path, "val", "train.epochs=2", WORKERS)
    process = start(command)
    for line in process.stdout:  # the epoch's last step is logged just before its validation starts
        if "step 4/8" in line:
            process.send_signal(signal.SIGTERM)
            break
    output = line + process.communicate(timeout=600)[0]
    assert process.returncode == 75 and "validation Dice" not in output, output
    state = final_state(tmp_path / "val")["train_state"]
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (
        0,
        4,
        4,
    )  # the finished, unvalidated epoch
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "epoch 1: validation Dice" in resumed.stdout and "epoch 2: validation Dice" in resumed.stdout
    rows = [json.loads(line) for line in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/dice" in r] == [4, 8]


def test_ranks_whose_launcher_is_killed_stop_at_once_and_write_nothing_more(tmp_path, tiny_dataset):
    command = trainer(2) + overrides(
        tiny_dataset, tmp_path, "orphans", "train.epochs=40", "checkpoint.every_steps=2", WORKERS
    )
    run_dir = tmp_path / "orphans"
    process = start(command)
    wait_for(run_dir / "checkpoints" / "ckpt-00000004.pt", process)
    ranks, below = direct_children(process.pid), job_processes(process.pid)[1:]
    os.kill(process.pid, signal.SIGKILL)  # torchrun alone: its ranks run in sessions of their own
    process.wait()
    wait_until_gone(ranks, timeout=10)
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    wait_until_gone(below, timeout=30)  # and their loader workers
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == files
    assert final_state(run_dir)["train_state"]["global_step"] < 40 * 8 // 4
    assert "its launcher" in process.stdout.read()


def test_a_second_job_on_a_held_run_directory_is_refused_and_a_dead_jobs_lock_is_taken_over(tmp_path, tiny_dataset):
    command = trainer(1) + overrides(
        tiny_dataset, tmp_path, "held", "train.epochs=40", "checkpoint.every_steps=2", WORKERS
    )
    first = start(command)
    wait_for(tmp_path / "held" / "checkpoints" / "ckpt-00000002.pt", first)
    second = run(command)
    assert second.returncode == 2, second.stdout + second.stderr
    assert second.stderr.strip().splitlines() == [second.stderr.strip()]
    assert f"is in use by another job (pid {first.pid} on host {socket.gethostname()} since " in second.stderr
    kill_whole_job(first)
    # The first job went on while the second was refused (seconds on a loaded machine): go one epoch past it.
    epochs = final_state(tmp_path / "held")["train_state"]["epoch"] + 2
    taken_over = run(trainer(1) + overrides(tiny_dataset, tmp_path, "held", f"train.epochs={epochs}", WORKERS))
    assert taken_over.returncode == 0 and "resumed at epoch" in taken_over.stdout, taken_over.stdout + taken_over.stderr


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_finishes(tmp_path, tiny_dataset):
    command = torchrun(2, "--max-restarts=1") + ["-m", "unet3d_dist.train"]
    command += overrides(
        tiny_dataset, tmp_path, "restart", "train.epochs=10", "checkpoint.every_steps=3", "train.val_every=5", WORKERS
    )
    process = start(command)
    wait_for(tmp_path / "restart" / "checkpoints" / "ckpt-00000003.pt", process)
    ranks = direct_children(process.pid)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert "resumed at epoch" in output
    assert final_state(tmp_path / "restart")["train_state"]["global_step"] == 10 * 8 // 4


def test_two_node_rendezvous_on_localhost(tmp_path, tiny_dataset):
    endpoint = f"127.0.0.1:{free_port()}"
    report = tmp_path / "report.json"
    nodes = [
        start(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint={endpoint}",
                "--rdzv_id=two-node-test",
                str(HELPERS / "ddp_agreement.py"),
                str(report),
            ]
            + overrides(tiny_dataset, tmp_path, "nodes", "train.epochs=2", WORKERS)
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    data = json.loads(report.read_text())
    assert data["world_size"] == 2 and data["identical"]
    assert final_state(tmp_path / "nodes")["train_state"]["global_step"] == 2 * 8 // 4


def test_an_elastic_job_loses_a_node_and_finishes_on_the_other_with_the_same_crops_every_step(tmp_path, tiny_dataset):
    """Two fake nodes (launch/multinode.sh with NNODES=1:2: two torchrun agents meeting at a c10d rendezvous on
    127.0.0.1, loader workers on). The node that does not host the rendezvous is killed whole (agent, rank,
    workers); torchrun restarts the group on the node left, which resumes from the last checkpoint on one rank and
    finishes. The crops logged at every step are the uninterrupted run's, and the weights end as close to it as an
    uninterrupted 1-rank run of the same global batch does."""
    steps, every = 32, 3
    extra = (
        "train.epochs=8",
        "data.samples_per_epoch=16",
        f"checkpoint.every_steps={every}",
        "train.val_every=0",
        "checkpoint.keep_last=20",
        "log.crop_keys=true",
        "train.global_batch=4",  # the default, batch x world size at the start, would depend on who joins first
        WORKERS,
    )
    for world, name in ((2, "two"), (1, "one")):
        done = run(trainer(world) + overrides(tiny_dataset, tmp_path, name, *extra))
        assert done.returncode == 0, done.stdout + done.stderr
    env = {**two_fake_nodes("1:2"), "RDZV_CONF": "last_call_timeout=3"}
    command = [str(REPO / "launch" / "multinode.sh"), *overrides(tiny_dataset, tmp_path, "elastic", *extra)]
    host, other = start_nodes(command, env, tmp_path / "other.log")
    wait_for(tmp_path / "elastic" / "checkpoints" / f"ckpt-{2 * every:08d}.pt", host)
    kill_whole_job(other)
    output = host.communicate(timeout=300)[0]
    assert host.returncode == 0, output
    assert "on 1 rank(s) (was 2): 4 crop(s) per rank (2 micro-batches of 2) x 1 rank(s)" in output, output
    ends = {name: final_state(tmp_path / name) for name in ("two", "one", "elastic")}
    assert ends["elastic"]["train_state"]["global_step"] == steps
    keys = {name: read_crop_keys(tmp_path / name) for name in ("two", "elastic")}
    assert sorted(keys["elastic"]) == list(range(1, steps + 1)) and keys["elastic"] == keys["two"]
    assert max_distance(ends["elastic"], ends["two"]) <= 2 * max_distance(ends["one"], ends["two"]) + 1e-7


def test_a_lost_node_of_a_fixed_size_job_ends_the_other_in_one_sentence_and_the_same_command_resumes(
    tmp_path, tiny_dataset
):
    """Two fake nodes with NNODES=2 (no restarts): one is killed whole after a checkpoint. The other says in one
    line, as its last, at which step a node was lost and which checkpoint the same command resumes from, exits 75
    and holds no lock; the same command on both nodes then resumes and finishes."""
    extra = ("train.epochs=3", "data.samples_per_epoch=16", "checkpoint.every_steps=3", "train.val_every=0", WORKERS)
    env = two_fake_nodes("2")
    command = [str(REPO / "launch" / "multinode.sh"), *overrides(tiny_dataset, tmp_path, "fixed", *extra)]
    run_dir = tmp_path / "fixed"
    host, other = start_nodes(command, env, tmp_path / "other.log")
    wait_for(run_dir / "checkpoints" / "ckpt-00000006.pt", host)
    kill_whole_job(other)
    output = host.communicate(timeout=120)[0]
    assert host.returncode == 75, output
    assert "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    lost = re.fullmatch(
        r"error: another process of the job ended at step (\d+) \(.+\): .*resumes from (\S+) in .+", last
    )
    assert lost and int(lost[1]) >= 6 and (run_dir / "checkpoints" / lost[2]).is_file(), output
    assert_lock_free(run_dir)

    host, other = start_nodes(command, env, tmp_path / "other.log")
    output = host.communicate(timeout=300)[0]
    assert host.returncode == 0 and other.wait(timeout=60) == 0, output
    output += (tmp_path / "other.log").read_text()  # rank 0, which says so, may be on either node
    assert "resumed at epoch" in output and final_state(run_dir)["train_state"]["global_step"] == 12, output


def test_resume_with_an_incompatible_model_is_refused_with_the_differences(tmp_path, tiny_dataset):
    first = run(trainer(1) + overrides(tiny_dataset, tmp_path, "shape", "train.epochs=1"))
    assert first.returncode == 0, first.stderr
    second = run(
        trainer(1)
        + overrides(tiny_dataset, tmp_path, "shape", "train.epochs=2", "model.widths=[8,8,16,16]", "model.norm=batch")
    )
    assert second.returncode == 2
    assert "the configuration is incompatible" in second.stderr
    assert "model.widths: [4, 8, 8, 16] -> [8, 8, 16, 16]" in second.stderr
    assert "model.norm: 'group' -> 'batch'" in second.stderr


def max_distance(a: dict, b: dict) -> float:
    return max((a["model"][name] - b["model"][name]).abs().max().item() for name in a["model"])


def logged_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["train/loss"] for row in map(json.loads, lines) if "train/loss" in row}


def killed_after_checkpoint(command: list[str], run_dir: Path, every: int) -> int:
    """Start ``command``, SIGKILL the whole job once it has written the next checkpoint, return its step."""
    before = final_state(run_dir)["train_state"]["global_step"] if (run_dir / "checkpoints").exists() else 0
    process = start(command)
    wait_for(run_dir / "checkpoints" / f"ckpt-{(before // every + 1) * every:08d}.pt", process)
    kill_whole_job(process)
    return final_state(run_dir)["train_state"]["global_step"]


def test_a_run_continues_on_another_world_size_2_1_2_with_the_same_global_batch(tmp_path, tiny_dataset):
    """Killed on 2 ranks, resumed on 1, killed, resumed on 2 (loader workers on): each resume says what changed, the
    1-rank part accumulates two micro-batches, and the run ends as close to an uninterrupted 2-rank run as an
    uninterrupted 1-rank run of the same global batch is; every step's loss is the same on 1 and 2 ranks."""
    steps, every = 24, 3
    extra = (
        "train.epochs=6",
        "data.samples_per_epoch=16",
        f"checkpoint.every_steps={every}",
        "log.every_steps=1",
        "checkpoint.keep_last=20",
        "train.val_every=0",
        WORKERS,
    )
    for world, name in ((2, "two"), (1, "one")):
        done = run(trainer(world) + overrides(tiny_dataset, tmp_path, name, *extra, "train.global_batch=4"))
        assert done.returncode == 0, done.stdout + done.stderr
    elastic = tmp_path / "elastic"
    command = {world: trainer(world) + overrides(tiny_dataset, tmp_path, "elastic", *extra) for world in (1, 2)}
    first = killed_after_checkpoint(command[2], elastic, every)
    second = killed_after_checkpoint(command[1], elastic, every)
    assert first < second < steps, "a part finished before it could be killed"
    last = run(command[2])
    assert last.returncode == 0, last.stdout + last.stderr
    assert f"resumed at step {second} on 2 rank(s) (was 1): 2 crop(s) per rank x 2 rank(s)" in last.stdout
    ends = {name: final_state(tmp_path / name) for name in ("two", "one", "elastic")}
    assert ends["elastic"]["train_state"]["global_step"] == steps
    assert ends["elastic"]["train_state"]["global_batch"] == 4 and ends["elastic"]["train_state"]["world_size"] == 2
    one_rank = max_distance(ends["one"], ends["two"])
    assert max_distance(ends["elastic"], ends["two"]) <= 2 * one_rank + 1e-7, (ends, one_rank)
    two, one, resumed = (logged_losses(tmp_path / name) for name in ("two", "one", "elastic"))
    assert sorted(two) == sorted(resumed) == list(range(1, steps + 1))
    assert all(abs(two[s] - one[s]) < 1e-5 and abs(two[s] - resumed[s]) < 1e-5 for s in two), (two, one, resumed)


def test_a_resume_on_one_rank_says_what_changed_and_a_global_batch_that_does_not_divide_is_refused(
    tmp_path, tiny_dataset
):
    first = run(trainer(2) + overrides(tiny_dataset, tmp_path, "world", "train.epochs=1"))
    assert first.returncode == 0, first.stdout + first.stderr
    second = run(trainer(1) + overrides(tiny_dataset, tmp_path, "world", "train.epochs=2"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert (
        "resumed at step 2 on 1 rank(s) (was 2): 4 crop(s) per rank (2 micro-batches of 2) x 1 rank(s)" in second.stdout
    )
    odd = run(trainer(2) + overrides(tiny_dataset, tmp_path, "odd", "train.global_batch=6"))
    assert odd.returncode != 0 and (
        "error: train.global_batch=6 in groups of train.batch_size=2 does not divide over the 2 ranks of this run; "
        "world sizes that work: 1, 3\n" in odd.stderr
    ), odd.stderr
    assert not (tmp_path / "odd" / "checkpoints").exists()
