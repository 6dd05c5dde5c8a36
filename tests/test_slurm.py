"""The sbatch scripts on a real Slurm cluster: two nodes, n1 and n2, on 127.0.0.1, CPU only.

The session fixture installs slurm-wlm and munge with apt when they are missing (root only; otherwise the tests
are skipped and say why), starts a private munged, slurmctld and two slurmd daemons from a slurm.conf in a
temporary folder, and stops each of them by pid at the end.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, WORKERS, assert_bitwise_equal, final_state, free_port, overrides

SLURM_CONF = """\
ClusterName=unet3d-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={controller_port}
SlurmdPort={n1_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again once its old credential has expired: 5 s instead of 120.
AuthInfo=socket={root}/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Look at pending jobs every 2 s rather than every 60 s, so that a requeued job starts as soon as it may.
SchedulerParameters=sched_interval=2
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting database for sacct).
MinJobAge=600
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=n1 NodeAddr=127.0.0.1 Port={n1_port} CPUs=2
NodeName=n2 NodeAddr=127.0.0.1 Port={n2_port} CPUs=2
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""
# What the tests change in the scripts' defaults: no GPUs, one of the two CPUs of a node per task.
CPU_JOB = ("--gpus-per-node=0", "--cpus-per-task=1")
# Long enough that a job is still running when the test signals it right after its second checkpoint: on an idle
# machine 8 epochs of the tiny run ended in the second or so that polling scontrol and scancel took.
EPOCHS = 60
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_until(condition: Callable[[], object], what: str, timeout: float = 300) -> object:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
    return result


def ensure_installed() -> None:
    """Install slurm-wlm and munge from apt if they are missing; skip (with the reason) when that is not possible."""
    if all(shutil.which(tool) for tool in ("munged", "slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed, and installing slurm-wlm and munge with apt needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
        if result.returncode != 0:
            pytest.skip(
                f"cannot install Slurm: `{' '.join(command)}` exited {result.returncode}: "
                f"{result.stderr.strip()[-500:]}"
            )


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"), "PYTHON": sys.executable, "NPROC": "1"}

    def run(self, *command: str) -> str:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result.stdout

    def submit(self, script: str, *args: str, logs: Path) -> str:
        """sbatch a script of slurm/ from the repository root, as users do; return the job id."""
        command = ["sbatch", "--parsable", *CPU_JOB, f"--output={logs}/%x-%j.out", f"slurm/{script}", *args]
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, cwd=REPO, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "--oneliner", job_id)))

    def wait_for_checkpoint(self, run_dir: Path, job_id: str) -> None:
        """Until the job's first step checkpoint exists (any: with keep_last the first is pruned later on)."""

        def ready() -> bool:
            state = self.job(job_id)["JobState"]
            assert state not in FINISHED, f"job {job_id} ended ({state}) before it wrote a checkpoint"
            return any((run_dir / "checkpoints").glob("ckpt-*.pt"))

        wait_until(ready, f"a checkpoint in {run_dir} from job {job_id}")

    def wait_until_finished(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        return wait_until(
            lambda: (j := self.job(job_id))["JobState"] in FINISHED and j, f"job {job_id} to end", timeout
        )


def start_daemon(command: list[str], pid_file: Path, started: list[tuple[str, int]]) -> None:
    """Start a daemon that forks into the background and record its pid."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{command[0]} did not start: {result.stderr}"
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), f"{pid_file.name}", timeout=30)
    started.append((command[0], int(pid_file.read_text())))


def stop_daemons(started: list[tuple[str, int]]) -> None:
    for _, pid in reversed(started):
        os.kill(pid, signal.SIGTERM)
    for name, pid in started:
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) to stop", timeout=60)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Cluster:
    ensure_installed()
    if os.geteuid() != 0:
        pytest.skip("running slurmd needs root")
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool-n1", "spool-n2"):
        (root / folder).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    ports = {"controller_port": free_port(), "n1_port": free_port(), "n2_port": free_port()}
    (root / "slurm.conf").write_text(SLURM_CONF.format(root=root, **ports))
    cluster = Cluster(root)
    started: list[tuple[str, int]] = []
    try:
        start_daemon(
            [
                "munged",
                "--force",
                f"--socket={root}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={root}/munged.pid",
                f"--log-file={root}/munged.log",
                f"--seed-file={root}/munged.seed",
            ],
            root / "munged.pid",
            started,
        )
        start_daemon(["slurmctld", "-f", str(root / "slurm.conf")], root / "slurmctld.pid", started)
        for node in ("n1", "n2"):
            start_daemon(["slurmd", "-f", str(root / "slurm.conf"), "-N", node], root / f"slurmd-{node}.pid", started)
        wait_until(
            lambda: cluster.run("sinfo", "--noheader", "--format=%T %D").split() == ["idle", "2"], "two idle nodes", 60
        )
        yield cluster
    finally:
        if len(started) == 4:  # jobs still running would leave their slurmstepd behind
            cluster.run("scancel", "--user=root")
            wait_until(lambda: not cluster.run("squeue", "--noheader").strip(), "the jobs to end", 120)
        stop_daemons(started)


def attempts(log: str) -> list[str]:
    return re.findall(r"^=== job \d+ \(\S+\), attempt (\d+)", log, re.M)


@pytest.fixture(scope="module")
def preempted_run(slurm, tiny_dataset, tmp_path_factory) -> tuple[dict[str, str], Path, str]:
    """slurm/train.sbatch on one node, sent SIGUSR1 with `scancel --signal=USR1` after its second step."""
    tmp = tmp_path_factory.mktemp("train-sbatch")
    args = overrides(
        tiny_dataset,
        tmp,
        "single",
        f"train.epochs={EPOCHS}",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=40",
        "train.val_every=4",
        WORKERS,
    )
    job_id = slurm.submit("train.sbatch", *args, logs=tmp)
    slurm.wait_for_checkpoint(tmp / "single", job_id)
    slurm.run("scancel", "--signal=USR1", job_id)  # reaches the step's processes, like --signal=USR1@N
    job = slurm.wait_until_finished(job_id)
    return job, tmp / "single", (tmp / f"unet3d-train-{job_id}.out").read_text()


def test_train_sbatch_checkpoints_on_usr1_requeues_itself_and_resumes_to_the_end(preempted_run):
    job, run_dir, log = preempted_run
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert attempts(log) == ["1", "2"], log
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+); checkpoint saved", log)
    assert stopped, log
    assert "srun: error: n1: task 0: Exited with exit code 75" in log
    assert "requeueing job" in log
    assert "resumed at epoch" in log and f", step {stopped[1]}\n" in log
    assert f"done: {EPOCHS * 8 // 2} steps" in log
    assert final_state(run_dir)["train_state"]["global_step"] == EPOCHS * 8 // 2
    assert not (run_dir / "stopped_by_signal.json").exists()


def test_evaluate_sbatch_writes_per_volume_results(slurm, preempted_run, tiny_dataset, tmp_path):
    _, run_dir, _ = preempted_run
    out = tmp_path / "eval"
    job_id = slurm.submit(
        "evaluate.sbatch",
        "--checkpoint",
        str(run_dir / "checkpoints" / "best.pt"),
        "--data",
        str(tiny_dataset),
        "--split",
        "test",
        "--out",
        str(out),
        logs=tmp_path,
    )
    job = slurm.wait_until_finished(job_id)
    log = (tmp_path / f"unet3d-eval-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    tables = list(out.glob("*.csv"))
    assert tables and list(out.glob("*.json")), sorted(out.rglob("*"))
    assert any("f" in row.values() for table in tables for row in csv.DictReader(table.open())), (
        "no row for test case f"
    )


def test_two_node_job_requeues_on_usr1_to_the_batch_shell_and_resumes_on_the_node_left(slurm, tiny_dataset, tmp_path):
    """A 2-node job; n2 is drained (a node lost to the cluster), the time-limit notice (USR1 to the batch shell)
    checkpoints every node's rank and the job requeues itself; it waits for 2 nodes until its request is cut to
    one (what a resubmission on fewer nodes does), then runs on n1 alone and the run continues there on 1 rank, with
    the same global batch, to the end."""
    steps = EPOCHS * 8 // (2 * 2)  # epochs of 8 crops, a global batch of 4
    args = overrides(
        tiny_dataset,
        tmp_path,
        "nodes",
        f"train.epochs={EPOCHS}",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=40",
        "train.val_every=4",
        WORKERS,
    )
    job_id = slurm.submit("train_multinode.sbatch", *args, logs=tmp_path)
    slurm.wait_for_checkpoint(tmp_path / "nodes", job_id)
    slurm.run("scontrol", "update", "nodename=n2", "state=drain", "reason=lost")
    try:
        slurm.run("scancel", "--batch", "--signal=USR1", job_id)  # only the batch shell, like --signal=B:USR1@N
        wait_until(lambda: (j := slurm.job(job_id))["Restarts"] == "1" and j["JobState"] == "PENDING", "the requeue")
        slurm.run("scontrol", "update", f"jobid={job_id}", "NumNodes=1", "NumTasks=1")
        job = slurm.wait_until_finished(job_id)
    finally:
        slurm.run("scontrol", "update", "nodename=n2", "state=resume")
    log = (tmp_path / f"unet3d-train-multinode-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"], job["NodeList"]) == ("COMPLETED", "0:0", "1", "n1"), log
    assert attempts(log) == ["1", "2"], log
    assert "SIGUSR1: the step checkpoints and stops" in log and "stopped by SIGUSR1" in log
    for task in ("n1: task 0", "n2: task 1"):  # each node's launcher saw the stop marker
        assert f"srun: error: {task}: Exited with exit code 75" in log, log
    assert log.count("world=2") == 1 and log.count("world=1") == 1, log
    assert "on 1 rank(s) (was 2): 4 crop(s) per rank (2 micro-batches of 2) x 1 rank(s)" in log, log
    assert final_state(tmp_path / "nodes")["train_state"]["global_step"] == steps


def test_scancel_checkpoints_within_killwait_and_a_requeue_ends_bitwise_equal_to_an_uninterrupted_run(
    slurm, tiny_dataset, tmp_path
):
    extra = (
        f"train.epochs={EPOCHS // 4}",
        "data.samples_per_epoch=24",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=10",
        WORKERS,
        "log.wandb=offline",  # its service process is signalled too
    )
    reference = slurm.submit("train.sbatch", *overrides(tiny_dataset, tmp_path, "reference", *extra), logs=tmp_path)
    job_id = slurm.submit("train.sbatch", *overrides(tiny_dataset, tmp_path, "cancelled", *extra), logs=tmp_path)
    run_dir = tmp_path / "cancelled"
    slurm.wait_for_checkpoint(run_dir, job_id)
    slurm.run("scancel", job_id)  # SIGTERM to every process of the job, SIGKILL after KillWait (30 s)
    job = slurm.wait_until_finished(job_id)
    log = (tmp_path / f"unet3d-train-{job_id}.out").read_text()
    assert job["JobState"] == "CANCELLED", log
    marker = json.loads((run_dir / "stopped_by_signal.json").read_text())  # written before the SIGKILL
    assert marker["signal"] == "SIGTERM" and (run_dir / "checkpoints" / f"ckpt-{marker['step']:08d}.pt").exists(), log
    assert "no requeue from this job" in log and "requeueing job" not in log, log
    assert "DataLoader worker" not in log and "[rank" not in log and "Traceback" not in log, log
    ours = [line for line in log.strip().splitlines() if not line.startswith(("srun:", "slurmstepd"))]
    assert ours[-1].startswith("stopped by SIGTERM"), log  # nothing but Slurm's own lines after the run's sentence

    slurm.run("scontrol", "requeue", job_id)  # what a preemption with PreemptMode=REQUEUE does by itself
    job = wait_until(
        lambda: (j := slurm.job(job_id))["Restarts"] == "1" and j["JobState"] in FINISHED and j,
        f"job {job_id} to run again",
    )
    log = (tmp_path / f"unet3d-train-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert attempts(log) == ["1", "2"] and f", step {marker['step']}\n" in log, log
    assert slurm.wait_until_finished(reference)["JobState"] == "COMPLETED"
    assert_bitwise_equal(final_state(tmp_path / "reference"), final_state(run_dir))


def test_srun_without_torchrun_gives_every_task_its_rank_and_its_nodes_task_count(slurm):
    code = "from unet3d_dist.dist import _from_environment; print(*_from_environment())"
    out = slurm.run(
        "srun",
        "--nodes=2",
        "--ntasks=3",
        "--cpus-per-task=1",
        "--export=ALL,MASTER_ADDR=127.0.0.1",
        sys.executable,
        "-c",
        code,
    )
    # (rank, local rank, world size, tasks on the node): 2 tasks on the first node, 1 on the second
    assert sorted(tuple(map(int, line.split())) for line in out.splitlines()) == [
        (0, 0, 3, 2),
        (1, 1, 3, 2),
        (2, 0, 3, 1),
    ]
