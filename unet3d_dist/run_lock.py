"""One job at a time per run directory: rank 0 holds a POSIX lock on ``<run dir>/run.lock`` while it trains.

The kernel releases the lock when its holder ends, however it ends (SIGKILL, a node reboot for NFS's lock
manager), so the lock of a dead job is simply taken over and never needs cleaning up. POSIX record locks belong to
one process, so DataLoader workers forked from rank 0 do not keep it alive after rank 0 is gone.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_FILE = "run.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live job holds the run directory."""


def hold_run_directory(run_dir: Path) -> int:
    """Lock ``run_dir`` for this process (for its lifetime) and record who holds it; return the lock's descriptor.

    Raises RunDirectoryBusy naming the holder (host, pid, start time) when another process has it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise RunDirectoryBusy(
            f"run directory {run_dir} is in use by another job ({describe_holder(path)}); wait for it to end or stop "
            "it, or choose another log.run_name"
        ) from None
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)
    return fd


def describe_holder(path: Path) -> str:
    """'pid P on host H since T', read from a lock file that another process holds."""
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on host {holder['host']} since {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"
