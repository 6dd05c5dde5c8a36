"""Stop signals (SIGTERM, SIGUSR1, SIGINT): wherever they land, the rank decides when to stop.

Slurm's scancel, time limit and preemption signal every process of a job step; a terminal's Ctrl-C signals its
foreground process group; torchrun passes signals on to each rank's whole process group. So a signal may reach the
launcher, the ranks and their DataLoader and metric workers, alone or all together. A worker never stops by
itself (its death would end the rank with a traceback and no checkpoint): it records the signal in a word shared
with its rank, which reads it with its own after every step. The ranks then agree to stop after the same step.

A rank that exits ends its workers with SIGTERM too (multiprocessing's exit handler), so the rank first says so in
a second shared word; a worker then ends at SIGTERM as torch's own handler would.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SIGNAL_FROM_WORKERS, RANK_EXITING = 0, 1  # the words shared with the workers
# Slurm and torchrun may deliver one Ctrl-C twice within milliseconds (to the rank, then forwarded by torchrun);
# only a SIGINT this long after the first is a second Ctrl-C, which stops at once without a checkpoint.
SECOND_CTRL_C_AFTER_S = 1.0


class StopRequest:
    """Remembers the first stop signal that reached this rank or one of its workers."""

    def __init__(self) -> None:
        self._shared = multiprocessing.RawArray("i", 2)  # before workers fork (or spawn, which pickles it)
        self._own = 0
        self._own_at = 0.0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        # Runs before multiprocessing's own exit handler (registered at its import), which terminates the workers.
        atexit.register(self._shared.__setitem__, RANK_EXITING, 1)

    def _handle(self, signum: int, frame: Any) -> None:
        if (
            signum == signal.SIGINT
            and self._own == signal.SIGINT
            and time.monotonic() - self._own_at >= SECOND_CTRL_C_AFTER_S
        ):
            raise KeyboardInterrupt
        if not self._own:
            self._own, self._own_at = signum, time.monotonic()

    @property
    def requested(self) -> bool:
        return bool(self._own or self._shared[SIGNAL_FROM_WORKERS])

    @property
    def signal_name(self) -> str | None:
        number = self._own or self._shared[SIGNAL_FROM_WORKERS]
        return signal.Signals(number).name if number else None

    @property
    def worker_init(self) -> Callable[[int], None]:
        """``worker_init_fn`` for DataLoader workers (also fits ProcessPoolExecutor's ``initializer`` with no id)."""
        return functools.partial(record_in_worker, self._shared)


def record_in_worker(shared: Any, worker_id: int | None = None) -> None:
    """In a worker: a stop signal is written to the rank's shared word instead of ending the worker, unless it is
    the rank's own SIGTERM as it exits."""

    def record(signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM and shared[RANK_EXITING]:
            os._exit(0)
        if not shared[SIGNAL_FROM_WORKERS]:
            shared[SIGNAL_FROM_WORKERS] = signum

    for sig in STOP_SIGNALS:
        signal.signal(sig, record)
