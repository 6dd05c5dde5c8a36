"""The device check as it will run on the bare GPU machine, rehearsed on the CPU: no SimpleITK, medpy or wandb, no
install (the checkout on PYTHONPATH), every row of the GPU run, and rows on disk as soon as they are measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, overrides

BARE = REPO / "tests" / "helpers" / "bare_machine"
ROWS = [  # every row the GPU run gives, in order (the sizes are in the results, not the names)
    "conv3d peak bf16",
    "conv3d peak fp16",
    "conv3d peak fp32",
    "step bf16 channels_last eager",
    "step bf16 contiguous eager",
    "host syncs in 5 training steps, loader workers + device augmentation",
    "host syncs in 5 training steps, device-resident data",
    "train.channels_last=auto picks",
    "GroupNorm block in channels_last: layout copies",
    "step bf16 channels_last compiled",
    "step bf16 contiguous compiled",
    "data: crops/s the fastest step needs",
    "data: loader workers (la_mri augmentation, finished on the device)",
    "data: device-resident (la_mri augmentation)",
    "quickstart training (the default config, seed 0)",
    "evaluate: sliding window (bf16, overlap 0.5)",
    "evaluate: medpy-exact metrics of one volume",
    "bf16 in hardware",
    "a non-finite bf16 step is skipped, the weights untouched",
    "the device's RNG state restores from a checkpoint's",
    "torchrun 1 process: gradient all-reduce and the gloo side group",
]


def device_check(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "unet3d_dist.bench", "gpu", "--tiny", "--out", str(out), *args]


def bare_environment() -> dict[str, str]:
    """The GPU machine's: nothing installed but the checkout on the path, and no SimpleITK, medpy or wandb."""
    return {**os.environ, "PYTHONPATH": f"{BARE}{os.pathsep}{REPO}", "CUDA_VISIBLE_DEVICES": ""}


def rows(out: Path) -> list[dict]:
    lines = (out / "gpu.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]  # after the header


def test_the_device_check_rehearses_every_row_where_simpleitk_medpy_and_wandb_are_missing(tmp_path):
    out = tmp_path / "out"
    # It took 288 s beside a training job and the test suite on 2 cores; the timeout only catches a hang.
    result = subprocess.run(
        device_check(out), cwd=REPO, env=bare_environment(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    measured = rows(out)
    assert [row["row"] for row in measured] == ROWS, result.stdout
    assert not [row for row in measured if "WRONG" in str(row.get("result"))]
    header = json.loads((out / "gpu.jsonl").read_text().splitlines()[0])["header"]
    assert header["sizes"]["compile_backend"] == "aot_eager" and "gpu" not in header
    table = (out / "gpu.md").read_text()
    assert all(f"| {name} |" in table for name in ROWS)
    assert sorted(p.name for p in out.iterdir()) == ["gpu.jsonl", "gpu.md", "runs"]
    assert "validation Dice 0." in next(r for r in measured if r["row"].startswith("quickstart"))["result"]


def test_rows_measured_before_a_kill_are_on_disk_whole(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        device_check(out),
        cwd=REPO,
        env=bare_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    jsonl, deadline = out / "gpu.jsonl", time.monotonic() + 120
    while not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= 4):  # the header and three rows
        assert process.poll() is None and time.monotonic() < deadline, "the check ended before its third row"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    measured = rows(out)
    assert [row["row"] for row in measured[:3]] == ROWS[:3]
    assert all(row["tflops"] > 0 for row in measured[:3])
    # The table is rewritten after each JSON line: whole, and at most the row in flight behind them.
    table = [line.split(" | ")[0][2:] for line in (out / "gpu.md").read_text().splitlines()[4:]]
    assert table == [row["row"] for row in measured][: len(table)] and len(table) >= len(measured) - 1


def test_training_and_evaluation_run_where_simpleitk_medpy_and_wandb_are_missing(tmp_path, tiny_dataset):
    """The quickstart's commands on the bare machine: training asked for wandb says in one line that it logs to
    metrics.jsonl only; evaluate writes HDF5 masks, and asked for NIfTI masks says in one sentence what it needs."""
    env = bare_environment()
    trained = subprocess.run(
        [sys.executable, "-m", "unet3d_dist.train", *overrides(tiny_dataset, tmp_path, "bare", "log.wandb=offline")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "wandb is not installed here, so this run logs to metrics.jsonl only" in trained.stdout
    assert not (tmp_path / "bare" / "wandb").exists() and (tmp_path / "bare" / "metrics.jsonl").exists()
    evaluate = [
        sys.executable,
        "-m",
        "unet3d_dist.evaluate",
        "--checkpoint",
        str(tmp_path / "bare" / "checkpoints" / "best.pt"),
        "--split",
        "test",
        "--panels",
        "0",
    ]
    refused = subprocess.run(evaluate, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "error: --mask-format nifti (use --mask-format hdf5 without it) needs the Python package SimpleITK, which is "
        "not installed here (pip install SimpleITK)"
    ), refused.stderr
    scored = subprocess.run(
        [*evaluate, "--mask-format", "hdf5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert (tmp_path / "bare" / "eval-test" / "results.json").exists()
