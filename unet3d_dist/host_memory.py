"""Keep freed host memory in the process, so large CPU tensors are not faulted in afresh on every step.

glibc serves each allocation above its mmap threshold (32 MB at most) with a new mapping and unmaps it on free.
A CPU training step at 112x112x80 allocates and frees dozens of such activations (64 MB each at 16 channels), so
the kernel hands out and zeroes about 5 GB of fresh pages per step: a fifth of the step's CPU time. With mmap and
heap trimming off, freed blocks are reused instead. The cost is that the process keeps its peak memory until it
exits, which a training or evaluation process reaches again on every step anyway.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Turn off glibc's mmap for large blocks and its heap trimming; False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
