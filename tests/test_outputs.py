"""Output folders the commands cannot use, on real mounts: one another job holds, a full disk (a 3 MB tmpfs) and a
read-only bind mount. Every command ends in one sentence naming the path, exit status 2, no traceback, nothing
half-written and no lock left held."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import REPO, TINY, assert_lock_free, overrides, recipe, start_nodes, train, two_fake_nodes
from test_evaluate import write_checkpoint

from unet3d_dist.run_lock import LOCK_FILE, hold_folder


@contextlib.contextmanager
def mounted(target: Path, *options: str) -> Iterator[Path]:
    """``mount OPTIONS TARGET`` for the test's length, always unmounted after; skipped without root or a mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs or a read-only bind needs root")
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(options)} failed: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_dataset) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("run") / "tiny" / "checkpoints" / "best.pt", tiny_dataset, 3)


@pytest.fixture(scope="module")
def prepare_input(tmp_path_factory) -> tuple[Path, Path]:
    """A prepare recipe and a folder with one small case."""
    root = tmp_path_factory.mktemp("scans")
    case = root / "cases" / "case0"
    case.mkdir(parents=True)
    for name in ("image.nii.gz", "labels.nii.gz"):
        sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkUInt8), str(case / name))
    return recipe(root), case.parent


def commands(checkpoint: Path, prepare_input: tuple[Path, Path], outs: dict[str, Path]) -> dict[str, list[str]]:
    """evaluate, predict and prepare into their ``outs``, on the CPU."""
    config, cases = prepare_input
    arguments = {
        "evaluate": ["--checkpoint", checkpoint, "--device", "cpu", "--workers", "0", "--wandb", "disabled"],
        "predict": ["--checkpoint", checkpoint, "scan.nii.gz", "--device", "cpu"],
        "prepare": ["--config", config, "--input", cases, "--jobs", "1"],
    }
    return {
        name: [sys.executable, "-m", f"unet3d_dist.{name}", *map(str, arguments[name]), "--out", str(outs[name])]
        for name in outs
    }


def refusal(command: list[str]) -> str:
    """Run ``command``; check it ends with exit status 2 and one error line, no traceback, having printed nothing
    else (refused before any work); return that line."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    printed = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in printed, printed
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and not result.stdout.strip(), printed
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_a_folder_another_job_holds_is_refused_naming_the_holder_and_left_as_it_was(
    tmp_path, checkpoint, prepare_input
):
    outs = {"evaluate": tmp_path / "eval", "predict": tmp_path / "predictions", "prepare": tmp_path / "dataset"}
    held = [outs["evaluate"], outs["predict"], tmp_path / "dataset.partial"]  # prepare builds in <out>.partial
    locks = [hold_folder(folder, "the test's folder", "", "") for folder in held]
    before = listing(tmp_path)
    holder = f"is in use by another job (pid {os.getpid()} on host {socket.gethostname()} since "
    try:
        for name, command in commands(checkpoint, prepare_input, outs).items():
            line = refusal(command)
            assert line.startswith(f"error: --out {outs[name]} {holder}") and line.endswith("choose another --out")
        assert listing(tmp_path) == before
        assert all(json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid() for folder in held)
    finally:
        for fd in locks:
            os.close(fd)


@pytest.mark.parametrize("world", [1, 2])
def test_a_full_disk_at_a_checkpoint_names_the_file_and_the_space_it_needs_and_keeps_no_partial_file(
    tmp_path, tiny_dataset, world
):
    """With two nodes (two fake ones, one rank each) only rank 0 writes, so only it meets the full disk; the other
    node's rank, waiting in the next step's all-reduce, sees a closed connection, repeats rank 0's sentence and exits
    2 too, rather than taking it for a lost node (whose 75 would requeue a job that fails again)."""
    with mounted(tmp_path / "tiny", "-t", "tmpfs", "-o", "size=3m", "tmpfs") as runs:
        bigger = ["model.widths=[8,16,32,64]", f"data.samples_per_epoch={2 * world}", "train.val_every=0"]
        if world == 1:
            result = train(runs, tiny_dataset, "log.run_name=full", *bigger, "train.epochs=1", check=False)
            printed, codes = result.stdout + result.stderr, {result.returncode}
        else:  # a second epoch, so that the other rank is in a collective when rank 0 fails
            args = overrides(tiny_dataset, runs, "full", *bigger, "train.epochs=2")
            host, other = start_nodes(
                [str(REPO / "launch" / "multinode.sh"), *args], two_fake_nodes("2"), tmp_path / "o"
            )
            printed = host.communicate(timeout=120)[0]
            codes = {host.returncode, other.wait(timeout=60)}
            printed += (tmp_path / "o").read_text()
        # The other node's launcher may still say 75 when the node hosting the rendezvous ended first (torchrun
        # reports the lost rendezvous, not its rank's code); its rank's own line and exit are checked below.
        assert 2 in codes and codes <= {2, 75} and "Traceback" not in printed, printed  # a checkpoint of 3.6 MB
        checkpoints = runs / "full" / "checkpoints"
        sentence = (
            rf"{re.escape(str(checkpoints / 'ckpt-00000001.pt'))} could not be written: "
            rf"{re.escape(str(checkpoints))} is on a full disk \(3\.6 MB needed, \d\.\d MB free\); free space "
            r"there, then run the same command again \(nothing half-written was kept\)$"
        )
        assert re.search("^error: " + sentence, printed, re.MULTILINE), printed
        if world == 1:
            assert re.fullmatch(f"error: {sentence}\n", result.stderr), result.stderr  # that line alone
        else:
            assert re.search("^error: rank 0 stopped the job: " + sentence, printed, re.MULTILINE), printed
            assert "a node or rank was lost" not in printed, printed
        assert list(checkpoints.iterdir()) == []  # no partial checkpoint
        assert_lock_free(runs / "full")


def test_a_read_only_output_folder_is_refused_before_any_work_in_every_command(
    tmp_path, tiny_dataset, checkpoint, prepare_input
):
    source = tmp_path / "source"
    source.mkdir()
    with mounted(tmp_path / "read-only", "--bind", "-o", "ro", str(source)) as read_only:
        if os.access(read_only, os.W_OK):
            pytest.skip("the bind mount did not become read-only")
        outs = {"evaluate": read_only / "eval", "predict": read_only / "pred", "prepare": read_only / "dataset"}
        train_command = [sys.executable, "-m", "unet3d_dist.train", f"data.dataset={tiny_dataset}", *TINY]
        assert refusal([*train_command, f"log.runs_dir={read_only}"]) == (
            f"error: run directory {read_only / 'synthetic'} is on a read-only file system; set log.runs_dir to a "
            "writable folder"
        )
        for name, command in commands(checkpoint, prepare_input, outs).items():
            assert refusal(command) == (
                f"error: --out {outs[name]} is on a read-only file system; set --out to a writable folder"
            ), name
