"""How a rank ends when another rank or node of its job ended first: every rank left fails in its next collective
and sees only a closed connection. One line per node says why, with the exit code that fits:
- a rank that stopped on an error of its own (a full disk at its checkpoint, say) leaves the error in the run
  directory first, so the others repeat its sentence and exit 2 as it does (75 would requeue a job that fails again);
- otherwise a node or rank was lost: exit 75, since the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

import torch.distributed as c10d

from .checkpoint import Checkpointer
from .config import Config
from .dist import DistEnv
from .exit_codes import BAD_INPUT, REQUEUE
from .files import OutputError, atomic_write_text
from .lines import say

ERROR_MARKER = "stopped_by_error.json"
# What gloo and NCCL say, in an error's first line, when another process of the job is gone; they raise
# RuntimeError (or DistError) and tell the cause only in the text.
PEER_LOSS_SIGNS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
    "remote process exited",
)


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective or store failing because another rank or node of the job ended (not one of
    this package's own errors, whose text may quote whatever they met)."""
    if type(err).__module__.startswith("unet3d_dist"):
        return False
    first_line = str(err).split("\n", 1)[0]
    return isinstance(err, c10d.DistNetworkError) or (
        isinstance(err, RuntimeError) and any(sign in first_line for sign in PEER_LOSS_SIGNS)
    )


def leave_error(run_dir: Path, rank: int, err: BaseException) -> None:
    """Record this rank's error for the ranks that will only see its connection close; best effort, since the error
    may be that the run directory cannot be written."""
    with contextlib.suppress(OSError, OutputError):
        atomic_write_text(run_dir / ERROR_MARKER, json.dumps({"rank": rank, "error": str(err)}) + "\n")


def error_left_since(run_dir: Path, since: float) -> dict | None:
    """The error another rank of this job left (written after ``since``, this process's start), if any."""
    path = run_dir / ERROR_MARKER
    with contextlib.suppress(OSError, ValueError):
        if path.stat().st_mtime >= since:
            return json.loads(path.read_text())
    return None


def end_after_peer(cfg: Config, env: DistEnv, step: int | None, err: BaseException, since: float) -> int:
    """Say, once per node, why the job ended under this rank; return its exit code."""
    left = error_left_since(cfg.run_dir, since)
    if left is not None:
        code, line = BAD_INPUT, f"error: rank {left['rank']} stopped the job: {left['error'].splitlines()[0]}"
    else:
        where = f" at step {step}" if step is not None else " while starting"
        latest = Checkpointer(cfg.run_dir, cfg.checkpoint.keep_last).latest()
        resume = f"resumes from {latest.name}" if latest else "starts afresh (no checkpoint yet)"
        reason = re.sub(r"^\[[^]]*\]\s*", "", str(err).splitlines()[0]).split(". ")[0]  # gloo: its source line first
        code, line = (
            REQUEUE,
            (
                f"error: another process of the job ended{where} ({reason}): a node or rank was lost; run the same "
                f"command on every node: it {resume} in {cfg.run_dir}"
            ),
        )
    if env.local_rank == 0:
        say(line, sys.stderr)
    return code
