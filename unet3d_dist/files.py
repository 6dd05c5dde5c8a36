"""Files that exist complete or not at all: the bottom layer every writer of the package uses.

A file is written under a temporary name in its own folder, fsynced and renamed, and the folder is fsynced, so a
reader (or a resumed run) never sees half a checkpoint, shard, manifest, mask or table, even after a crash.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

TEMPORARY_PREFIX = ".tmp-"
LINK_LOOP = "is a symbolic link loop (following its links leads back to it)"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it onto ``path``; clean up on failure.

    The temporary name ends like ``path`` (``.tmp-<pid>-<name>``), so writers that pick the format from the suffix,
    like SimpleITK, can write to it.
    """
    path = Path(path)
    tmp = path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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
