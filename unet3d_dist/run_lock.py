"""One writer at a time per output folder (a run directory, an evaluation, predictions, a dataset being prepared):
the process that writes it holds a POSIX lock on ``<folder>/run.lock``, which records its host, pid and start time.

The kernel releases the lock when its holder ends, however it ends (SIGKILL, a node reboot for NFS's lock
manager), so the lock of a dead job is simply taken over and never needs cleaning up; the file may remain. POSIX
record locks belong to one process, so DataLoader workers forked from the holder do not keep it alive after it is
gone. Taking the lock is also the first write into the folder, so a folder that cannot be written is refused here,
before any work.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .files import FULL, WRITE_ERRORS, OutputError

LOCK_FILE = "run.lock"
_held: set[Path] = set()  # the folders this process holds


def hold_folder(folder: Path, what: str, instead: str, where: str) -> int:
    """Lock ``folder`` (created if need be) for this process's lifetime and record who holds it; return the lock's
    descriptor, which stays open until the process ends.

    ``what`` names the folder in sentences ("--out PATH"), ``instead`` is the other choice a refused user has ("choose
    another --out") and ``where`` the setting that places the folder ("--out", "log.runs_dir"). Raises OutputError
    naming the holder (pid, host, start time) when another process has it, or saying why the folder cannot be written.
    """
    path = Path(folder) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise unwritable(err, what, where) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise OutputError(
            f"{what} is in use by another job ({describe_holder(path)}); wait for it to end or stop it, or {instead}"
        ) from None
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        raise unwritable(err, what, where) from None
    _held.add(Path(folder).resolve())
    return fd


def hold_out(out: Path, folder: Path | None = None) -> int:
    """Hold a command's ``--out`` (or the ``folder`` it is built in) as ``hold_folder`` does, for this process."""
    return hold_folder(folder or out, f"--out {out}", "choose another --out", "--out")


def unwritable(err: OSError, what: str, where: str) -> Exception:
    """The sentence for a folder that cannot be created or written (``err`` itself for any other failure)."""
    if err.errno not in WRITE_ERRORS:
        return err
    full = err.errno in FULL
    advice = f"free space there or set {where} to another folder" if full else f"set {where} to a writable folder"
    return OutputError(f"{what} {WRITE_ERRORS[err.errno]}; {advice}")


def describe_holder(path: Path) -> str:
    """'pid P on host H since T', read from a lock file that another process holds."""
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on host {holder['host']} since {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


@contextlib.contextmanager
def removed_if_left_empty(folder: Path) -> Iterator[None]:
    """A folder that does not exist yet, which this process then creates, holds and fails in before
    writing anything but its lock, is removed again: a refused run leaves no empty run directory behind. A folder
    another job took first is left alone."""
    folder = Path(folder)
    new = not folder.exists()
    try:
        yield
    except BaseException:
        ours = new and folder.resolve() in _held  # not one another job took first
        if ours and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            (folder / LOCK_FILE).unlink()
            folder.rmdir()
        raise
