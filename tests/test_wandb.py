"""wandb in offline mode: the run's files land in the run directory, and a resumed run continues the same wandb run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from test_distributed import final_state, overrides, start, trainer, wait_for


def test_offline_run_is_written_under_the_run_dir_and_a_resume_keeps_its_id(tmp_path, tiny_dataset, monkeypatch):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # keep wandb out of the home directory
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    command = trainer(1) + overrides(tiny_dataset, tmp_path, "wb", "train.epochs=2", "checkpoint.every_steps=2")
    command.append("log.wandb=offline")  # after TINY's log.wandb=disabled
    run_dir = tmp_path / "wb"

    process = start(command)
    wait_for(run_dir / "checkpoints" / "ckpt-00000002.pt", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at epoch" in resumed.stdout

    run_id = final_state(run_dir)["run_id"]
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders), folders
    records = (folders[-1] / f"run-{run_id}.wandb").read_bytes()
    for key in (b"train/loss", b"train/lr", b"train/crops_per_s", b"train/grad_norm", b"val/dice", b"samples_per_epoch"):
        assert key in records, key
    assert f"wandb sync {folders[-1]}\n" in resumed.stdout
