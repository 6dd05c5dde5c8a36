"""launch/*.sh: the commands they print, and a real two-worker run stopped by SIGTERM (exit 75), then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import REPO, WORKERS, final_state, overrides, start, wait_for

TORCHRUN = (
    f"env PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=100 "
    f"{sys.executable} -m unet3d_dist.torchrun"
)
LAUNCH_ENV = (
    "NPROC",
    "NNODES",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RDZV_ENDPOINT",
    "RDZV_ID",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
)


def launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return subprocess.run(
        [str(REPO / "launch" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**base, "PYTHON": sys.executable, **env},
    )


def test_dry_run_prints_the_command_and_runs_nothing(tmp_path):
    # Were the command run, it would fail on the missing dataset rather than print it.
    args = (f"data.dataset={tmp_path}/none", "log.run_name=a b", "model.widths=[4,8,8,16]")
    quoted = f"data.dataset={tmp_path}/none 'log.run_name=a b' 'model.widths=[4,8,8,16]'"
    debug = launch("debug.sh", "--dry-run", *args)
    assert (debug.returncode, debug.stdout) == (0, f"{sys.executable} -m unet3d_dist.train {quoted}\n")
    local = launch("local.sh", "--dry-run", *args, NPROC="3")
    assert local.stdout == f"{TORCHRUN} --standalone --nproc_per_node=3 -m unet3d_dist.train {quoted}\n"
    nodes = launch("multinode.sh", "--dry-run", *args, NNODES="2", NPROC="4", MASTER_ADDR="node1", MASTER_PORT="1234")
    assert nodes.stdout == (
        f"{TORCHRUN} --nnodes=2 --nproc_per_node=4 --max-restarts=0 --rdzv_backend=c10d --rdzv_endpoint=node1:1234 "
        f"--rdzv_id=unet3d -m unet3d_dist.train {quoted}\n"
    )
    elastic = launch("multinode.sh", "--dry-run", NNODES="1:3", NPROC="2", MASTER_ADDR="node1", RDZV_CONF="a=1")
    assert elastic.stdout.startswith("env 'UNET3D_ELASTIC_WORLD_SIZES=2 4 6' PET_SIGNALS_TO_HANDLE=")
    assert (
        "--nnodes=1:3 --nproc_per_node=2 --max-restarts=3 " in elastic.stdout and "--rdzv_conf=a=1 " in elastic.stdout
    )
    endpoint = launch(
        "multinode.sh", "--dry-run", NNODES="2", NPROC="1", RDZV_ENDPOINT="10.0.0.7:29400", RDZV_ID="job7"
    )
    assert "--rdzv_endpoint=10.0.0.7:29400 --rdzv_id=job7 -m unet3d_dist.train\n" in endpoint.stdout
    missing = launch("multinode.sh", "--dry-run", NPROC="1")
    assert missing.returncode == 2 and "set NNODES, and RDZV_ENDPOINT=host:port or MASTER_ADDR" in missing.stderr
    assert "usage: launch/local.sh" in launch("local.sh", "--help").stdout


def test_the_launchers_find_the_projects_interpreter_and_say_which(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX")}
    active = tmp_path / "env" / "bin" / "python"
    active.parent.mkdir(parents=True)
    active.symlink_to(sys.executable)
    for extra, expected in (
        ({"VIRTUAL_ENV": str(active.parent.parent)}, str(active)),  # the active environment first
        ({}, str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else "python3"),
    ):
        result = subprocess.run(
            [str(REPO / "launch" / "debug.sh"), "--dry-run"], capture_output=True, text=True, env={**env, **extra}
        )
        assert result.stdout == f"{expected} -m unet3d_dist.train\n"
        assert f"launch: python is {expected}" in result.stderr


def test_local_sh_exits_75_after_sigterm_and_the_same_command_resumes(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("NPROC", "2")
    args = overrides(
        tiny_dataset,
        tmp_path,
        "local",
        "train.epochs=6",
        "checkpoint.every_steps=3",
        "train.val_every=3",
        WORKERS,
        "log.wandb=offline",
    )
    command = [str(REPO / "launch" / "local.sh"), *args]
    run_dir = tmp_path / "local"

    process = start(command)
    wait_for(run_dir / "checkpoints" / "ckpt-00000003.pt", process)
    os.killpg(process.pid, signal.SIGTERM)  # what Ctrl-C or Slurm does: the whole process group
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 75, output
    assert "world=2" in output and "DataLoader worker" not in output and "Traceback" not in output, output
    assert output.strip().splitlines()[-1].startswith("stopped by SIGTERM"), output  # torchrun adds nothing after it
    marker = json.loads((run_dir / "stopped_by_signal.json").read_text())
    assert (run_dir / "checkpoints" / f"ckpt-{marker['step']:08d}.pt").exists()

    # A later run that fails before it resumes reports its own error, not the earlier stop (no requeue loop).
    failed = launch("debug.sh", *overrides(tmp_path / "gone", tmp_path, "local"))
    assert failed.returncode == 2 and "has no manifest.json" in failed.stderr

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at epoch" in resumed.stdout and f"step {marker['step']}" in resumed.stdout
    assert final_state(run_dir)["train_state"]["global_step"] == 6 * 8 // 4
