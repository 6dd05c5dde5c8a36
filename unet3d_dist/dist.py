"""The one module that reads the distributed environment.

It understands torchrun (RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE) and, when a job is started by
``srun`` without torchrun, SLURM's SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS. A world of one needs no process
group, so ``python -m unet3d_dist.train`` runs the same code as a 64-GPU job. Every other module receives a
``DistEnv`` and the collective helpers below.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as c10d

from .host_memory import keep_freed_memory


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def multi_rank(self) -> bool:
        return self.world_size > 1


ELASTIC_WORLD_SIZES = "UNET3D_ELASTIC_WORLD_SIZES"  # set by launch/multinode.sh for a node range, e.g. "2 4"


def elastic_world_sizes() -> list[int]:
    """Every world size an elastic job (a node range) may restart on, as its launcher announced them; empty if none."""
    return [int(size) for size in os.environ.get(ELASTIC_WORLD_SIZES, "").split()]


def _from_environment() -> tuple[int, int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world, int(env.get("LOCAL_WORLD_SIZE", world))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        # srun started one task per GPU without torchrun; the rendezvous address comes from the batch script.
        if "MASTER_ADDR" not in env:
            raise RuntimeError(
                "launched by srun with several tasks but MASTER_ADDR is not set (see slurm/train.sbatch)"
            )
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or env["SLURM_NTASKS"]
        local_world = tasks_per_node(spec)[int(env.get("SLURM_NODEID", 0))]
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), local_world
    return 0, 0, 1, 1


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed task counts per node, e.g. '2(x3),1' -> [2, 2, 2, 1] (as SLURM_STEP_TASKS_PER_NODE)."""
    counts = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


ORPHANED_EXIT_CODE = 1
LAUNCHER_POLL_S = 0.5


def exit_when_launcher_dies(rank: int) -> None:
    """Under torchrun, end this rank within a second of its launcher's death, writing nothing more.

    torchrun starts each rank in a session of its own, so a ``kill -9`` of the launcher (or of its process group)
    reaches no rank: orphaned ranks would train on, write checkpoints, and race a restarted job for the run
    directory. The launcher is the parent; once it is gone the rank is re-parented, which this thread notices.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher and launcher != 1:
            time.sleep(LAUNCHER_POLL_S)
        try:  # the launcher held the other end of stderr, which may now be closed or full
            os.write(
                2,
                f"rank {rank}: its launcher (pid {launcher}) is gone; stopping without writing anything "
                "more\n".encode(),
            )
        finally:
            os._exit(ORPHANED_EXIT_CODE)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def torchrun_command(nproc: int) -> list[str]:
    """Command prefix that starts ``nproc`` processes of this Python under torchrun on this machine (through
    unet3d_dist.torchrun, as the launch scripts do: the ranks' exit codes, no traceback of torchrun's own)."""
    return [sys.executable, "-m", "unet3d_dist.torchrun", "--standalone", f"--nproc_per_node={nproc}"]


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    if preference != "cpu" and torch.cuda.is_available():
        index = gpu_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU of a local rank: the rank's own index when the node's GPUs are all visible (torchrun), the only one
    when the task sees just its own (srun --gpus-per-task=1 gives each task one, as cuda:0)."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise RuntimeError(
        f"local rank {local_rank} has no GPU: {visible} are visible to it; give each rank its own GPU "
        "(srun --gpus-per-task=1) or show every rank the node's GPUs (torchrun --nproc_per_node=<GPUs>)"
    )


def _restart_safe_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict[str, Any]:
    """A store namespaced by torchrun's restart count, when workers share the agent's store.

    torch assumes each restart gets a fresh store, but after ``--max-restarts`` restarts the agent's store still
    holds the dead attempt's process-group addresses, and the new ranks connect to them ("Gloo connectFullMesh
    failed ... Connection refused"). Seen with torch 2.13 on CPU; the prefix costs nothing where it is not needed.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = c10d.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False, timeout=timeout)
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": c10d.PrefixStore(f"/unet3d_dist/attempt_{attempt}", store), "rank": rank, "world_size": world_size}


_control_group: Any = None


@contextlib.contextmanager
def runtime(device: str = "auto", timeout_s: int = 600, require_group: bool = False) -> Iterator[DistEnv]:
    """Join the process group (nccl on CUDA, gloo otherwise) and always leave it, even on errors.

    A world of one gets no group unless ``require_group`` (the GPU check exercises NCCL on a single GPU).
    On the CPU, large activations live in host memory, so freed memory is kept for reuse (see host_memory).
    """
    rank, local_rank, world_size, local_world_size = _from_environment()
    env = DistEnv(rank, local_rank, world_size, local_world_size, _pick_device(device, local_rank))
    exit_when_launcher_dies(rank)
    if env.device.type == "cpu":
        keep_freed_memory()
    else:  # every command runs fixed shapes (the crop, the window): let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True
    if (env.multi_rank or require_group) and not c10d.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        timeout = datetime.timedelta(seconds=timeout_s)
        c10d.init_process_group(
            backend="nccl" if env.device.type == "cuda" else "gloo",
            timeout=timeout,
            device_id=env.device if env.device.type == "cuda" else None,
            **_restart_safe_store(rank, world_size, timeout),
        )
        _create_control_group(timeout)
    try:
        yield env
    finally:
        global _control_group
        _control_group = None
        # Objects that hold the group (DDP's reducer) and are left only in reference cycles would otherwise be freed
        # during interpreter shutdown, with gloo's worker threads still running: an abort at exit under load.
        gc.collect()
        if c10d.is_initialized():
            c10d.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads the work's end (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_workers(env: DistEnv) -> int:
    """One loader worker per core of this rank's share of the job's CPUs, less one for the rank itself; at least 1.

    The job's CPUs are the ones this process may run on, and no more than Slurm gave the task (--cpus-per-task,
    which a task/none node does not enforce). Under torchrun the local ranks share the task's CPUs; a task that
    srun started alone is one rank with its own. There is no upper cap: a GPU that steps in 15 ms needs more crops
    per second than four workers make (``python -m unet3d_dist.bench data`` says how many).
    """
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sharing = env.local_world_size if "TORCHELASTIC_RUN_ID" in os.environ else 1
    return workers_for(affinity, int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or None, sharing)


def workers_for(affinity: int, slurm_cpus: int | None, ranks_sharing: int) -> int:
    cores = min(affinity, slurm_cpus) if slurm_cpus else affinity
    return max(1, cores // ranks_sharing - 1)


def _create_control_group(timeout: datetime.timedelta) -> None:
    """A gloo group for small host-side agreements (stop flags, gathers), so NCCL jobs need no GPU sync for them.

    Made at once, on every rank (new_group is collective), with the run's timeout instead of gloo's 30 minutes.
    """
    global _control_group
    _control_group = (
        c10d.new_group(backend="gloo", timeout=timeout) if c10d.get_backend() != "gloo" else c10d.group.WORLD
    )


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (one all-reduce)."""
    if not c10d.is_initialized():
        return flag
    value = torch.tensor([int(flag)])
    c10d.all_reduce(value, op=c10d.ReduceOp.MAX, group=_control_group)
    return bool(value.item())


class RankVote:
    """A flag that is true on every rank if it is true on any, whose all-reduce overlaps the next training step:
    cast after one step, read after the next. Every rank reads the same votes in the same order, so every rank acts
    on a vote after the same step, and none waits for the network in between (milliseconds at 64 ranks)."""

    def __init__(self, flag: bool):
        self.value = torch.tensor([int(flag)])
        self.work = None
        if c10d.is_initialized():
            self.work = c10d.all_reduce(self.value, op=c10d.ReduceOp.MAX, group=_control_group, async_op=True)

    def result(self) -> bool:
        if self.work is not None:
            self.work.wait()
        return bool(self.value.item())


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (in place semantics are avoided: returns a new tensor)."""
    if not c10d.is_initialized():
        return values
    values = values.clone()
    c10d.all_reduce(values, op=c10d.ReduceOp.SUM)
    return values / c10d.get_world_size()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Collect one picklable object per rank on rank 0 (others get None)."""
    if not c10d.is_initialized():
        return [obj]
    out = [None] * c10d.get_world_size() if c10d.get_rank() == 0 else None
    c10d.gather_object(obj, out, dst=0, group=_control_group)
    return out


def broadcast_from_main(obj: Any) -> Any:
    if not c10d.is_initialized():
        return obj
    box = [obj]
    c10d.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def barrier() -> None:
    if c10d.is_initialized():
        c10d.barrier(group=_control_group)


T = TypeVar("T")


def on_main(env: DistEnv, action: Callable[[], T], refusals: tuple[type[Exception], ...]) -> T | None:
    """``action()`` on rank 0 alone (taking a folder's lock, claiming it); a refusal among ``refusals`` that it raises
    is raised on every rank with the same sentence, so no rank goes on without it. Other ranks get None."""
    result, refusal = None, None
    if env.is_main:
        try:
            result = action()
        except refusals as err:
            refusal = err
    refusal = broadcast_from_main(refusal)
    if refusal is not None:
        raise refusal
    return result
