"""wandb in offline mode: files under the run directory, one wandb run across a kill and resume, no crash without it."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from conftest import final_state, overrides, start, trainer, wait_for


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """Keep wandb's settings and cache out of the home directory; the run's config, not WANDB_MODE, sets the mode."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def offline_run(dataset, tmp_path, name: str) -> list[str]:
    return trainer(1) + overrides(
        dataset, tmp_path, name, "train.epochs=2", "checkpoint.every_steps=2", "log.wandb=offline"
    )


def test_offline_run_is_written_under_the_run_dir_and_a_resume_keeps_its_id(tmp_path, tiny_dataset):
    command = offline_run(tiny_dataset, tmp_path, "wb")
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
    for key in (
        b"train/loss",
        b"train/lr",
        b"train/crops_per_s",
        b"train/grad_norm",
        b"val/dice",
        b"samples_per_epoch",
    ):
        assert key in records, key
    assert f"wandb sync {folders[-1]}\n" in resumed.stdout


def test_training_goes_on_when_the_wandb_service_dies(tmp_path, tiny_dataset):
    process = start(offline_run(tiny_dataset, tmp_path, "lost"))
    wait_for(tmp_path / "lost" / "checkpoints" / "ckpt-00000002.pt", process)
    service = subprocess.run(
        ["pgrep", "-P", str(process.pid), "wandb-core"], capture_output=True, text=True
    ).stdout.split()
    assert len(service) == 1
    os.kill(int(service[0]), signal.SIGTERM)  # Slurm signals every process of a job step, wandb's service too
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    assert "wandb stopped (" in output and "done: 8 steps" in output
    assert final_state(tmp_path / "lost")["train_state"]["global_step"] == 8
