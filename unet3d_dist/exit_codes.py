"""The exit codes every command, launcher and Slurm script agrees on (docs/LAUNCHING.md), and the one way a
command turns bad input into its sentence and exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .lines import say

BAD_INPUT = 2  # one sentence said what to fix; running again as it is would fail again
SOME_SKIPPED = 3  # prepare, predict: each bad case or scan was named in one sentence; the others were done
REQUEUE = 75  # EX_TEMPFAIL: stopped after a checkpoint or by a lost node; the same command resumes


class BadInput(Exception):
    """Input a command cannot use, or an output it cannot write. The message is one sentence that names the file or
    key and what was expected; the package's error classes (ConfigError, DatasetError, ...) derive from it."""


def said(err: BadInput) -> int:
    """Print the error's sentence, alone, on stderr; the exit code for it."""
    say(f"error: {err}", sys.stderr)  # every rank says it: whole lines
    return BAD_INPUT


def run_command(body: Callable[[], int | None]) -> None:
    """Run a command's body and exit with its code unless that is 0 (or None); bad input leaves as its sentence and
    BAD_INPUT."""
    try:
        code = body()
    except BadInput as err:
        code = said(err)
    if code:
        sys.exit(code)
