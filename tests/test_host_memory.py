"""On the CPU, freed host memory is kept for reuse instead of being mapped and returned afresh
(unet3d_dist.host_memory).

glibc's own counters (mallinfo2) say where a large tensor's memory came from and whether the heap kept it after
the free; unlike page-fault counts, they do not depend on what else the machine is doing.
"""

import platform
import subprocess
import sys

import pytest

SIXTY_FOUR_MB = 64 * 2**20

WHERE_A_64_MB_TENSOR_LIVES = """
import contextlib, ctypes, sys, torch
from unet3d_dist.dist import runtime

class MallInfo2(ctypes.Structure):
    names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    _fields_ = [(name, ctypes.c_size_t) for name in names]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
with runtime("cpu") if sys.argv[1] == "cpu job" else contextlib.nullcontext():
    heap = libc.mallinfo2().arena  # bytes the heap holds
    tensor = torch.ones(16 * 2**20)  # 64 MB, above glibc's largest mmap threshold
    mapped = libc.mallinfo2().hblkhd  # bytes in blocks glibc mapped for themselves
    del tensor
    kept = libc.mallinfo2().arena - heap  # what the heap grew by and still holds after the free
print(mapped, kept)
"""


def where_a_large_tensor_lives(setting: str) -> tuple[int, int]:
    result = subprocess.run(
        [sys.executable, "-c", WHERE_A_64_MB_TENSOR_LIVES, setting], capture_output=True, text=True, check=True
    )
    mapped, kept = map(int, result.stdout.split())
    return mapped, kept


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_a_cpu_job_serves_large_tensors_from_a_heap_that_keeps_them_after_the_free():
    mapped, kept = where_a_large_tensor_lives("plain process")
    assert mapped >= SIXTY_FOUR_MB and kept < SIXTY_FOUR_MB  # a mapping of its own, unmapped at the free
    mapped, kept = where_a_large_tensor_lives("cpu job")
    assert mapped < SIXTY_FOUR_MB and kept >= SIXTY_FOUR_MB  # from the heap, which keeps it for the next step
