"""Files that exist complete or not at all: the bottom layer every writer of the package uses.

A file is written under a temporary name in its own folder, fsynced and renamed, and the folder is fsynced, so a
reader (or a resumed run) never sees half a checkpoint, shard, manifest, mask or table, even after a crash.

A write that fails for want of space or permission (a full disk, a quota, a read-only mount) raises OutputError:
one sentence naming the file, which every command prints as its error line.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from .exit_codes import BadInput

TEMPORARY_PREFIX = ".tmp-"
LINK_LOOP = "is a symbolic link loop (following its links leads back to it)"
WRITE_ERRORS = {  # what each errno says about the path it names
    errno.ENOSPC: "is on a full disk",
    errno.EDQUOT: "is over its disk quota",
    errno.EROFS: "is on a read-only file system",
    errno.EACCES: "is not writable (permission denied)",
    errno.EPERM: "is not writable (operation not permitted)",
}
FULL = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL = 2**20  # free bytes under which a writer that gives no errno (torch, ITK) has met a full disk


class OutputError(BadInput, RuntimeError):
    """An output the command cannot write (full disk, read-only or forbidden folder) or a folder another job holds."""


def size_on_disk(paths: Iterable[Path]) -> int:
    """Bytes of the files, and of every file under the folders, among ``paths`` (a missing path weighs nothing):
    the load measure for sharing inputs among ranks."""
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def atomic_write(path: Path, write: Callable[[Path], object], size: int | None = None) -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it onto ``path``; clean up on failure.

    The temporary name ends like ``path`` (``.tmp-<pid>-<name>``), so writers that pick the format from the suffix,
    like SimpleITK, can write to it. ``size``, the bytes the file will take when known, goes into the sentence of
    a full disk.
    """
    path = Path(path)
    tmp = path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as err:
        failure = write_failure(err, path)
        if failure is None:
            raise
        raise write_error(path, failure, size, tmp) from err
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), size=len(data))


def write_failure(err: BaseException, path: Path) -> OSError | None:
    """The OSError of WRITE_ERRORS behind ``err`` (libraries wrap it); for a writer that reports no errno, a full disk
    when the one holding ``path`` has (nearly) no space left; None for any other failure."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in WRITE_ERRORS:
            return cause
        cause = cause.__cause__ or cause.__context__
    gave_no_errno = isinstance(err, RuntimeError) or (isinstance(err, OSError) and err.errno is None)
    if gave_no_errno and free_bytes(path.parent) < NEARLY_FULL:  # not a TypeError that happens on a full disk
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def write_error(path: Path, failure: OSError, size: int | None, tmp: Path) -> OutputError:
    """The sentence for a write of ``path`` that failed with ``failure``; ``tmp`` is the partial file, about to go."""
    why = f"{path} could not be written: {path.parent} {WRITE_ERRORS[failure.errno]}"
    if failure.errno not in FULL:
        return OutputError(f"{why}; make it writable, then run the same command again")
    written = tmp.stat().st_size if tmp.exists() else 0
    needed = megabytes(size) if size else f"more than {megabytes(written)}"
    return OutputError(
        f"{why} ({needed} needed, {megabytes(free_bytes(path.parent) + written)} free); free space there, then run "
        "the same command again (nothing half-written was kept)"
    )


def free_bytes(folder: Path) -> int:
    """Bytes this process may still write in ``folder``'s file system (one that cannot be asked counts as roomy)."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return sys.maxsize
    return stat.f_bavail * stat.f_frsize


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def forget_lines_after(path: Path, step: int) -> None:
    """Keep the JSON lines of ``path`` whose ``step`` is at most ``step`` (a resumed run redoes the later ones), and
    drop a line a kill cut short; rewritten whole or not at all."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-append
            continue
    atomic_write_text(path, "".join(kept))


def remove_unfinished(folder: Path) -> None:
    """Delete the temporary files of writers that were killed mid-write (only the folder's one writer calls this)."""
    for leftover in Path(folder).glob(f"{TEMPORARY_PREFIX}*") if Path(folder).is_dir() else []:
        leftover.unlink(missing_ok=True)


def is_link_loop(path: Path) -> bool:
    """True when following ``path``'s symbolic links never ends (``exists`` and ``is_file`` just say False)."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    return False


def why_missing(path: Path, otherwise: str = "does not exist") -> str:
    """What to say of a path that is not there: a symbolic link loop, or ``otherwise``."""
    return LINK_LOOP if is_link_loop(path) else otherwise
