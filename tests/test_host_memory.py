"""On the CPU, freed host memory is reused instead of being mapped and faulted in afresh (unet3d_dist.host_memory)."""

import platform
import subprocess
import sys

import pytest

PAGES_OF_64_MB = 64 * 2**20 // 4096

FAULTS_OF_THE_LAST_64_MB_TENSORS = """
import contextlib, resource, sys, torch
from unet3d_dist.dist import distributed
with distributed("cpu") if sys.argv[1] == "cpu job" else contextlib.nullcontext():
    for attempt in range(12):  # as a training loop does; glibc's heap needs a few rounds to settle
        if attempt == 9:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, above glibc's largest mmap threshold; freed at once
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_the_last_three(setting: str) -> int:
    result = subprocess.run([sys.executable, "-c", FAULTS_OF_THE_LAST_64_MB_TENSORS, setting], capture_output=True, text=True, check=True)
    return int(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_a_cpu_job_reuses_freed_large_tensors_without_page_faults():
    assert faults_of_the_last_three("plain process") > 2 * PAGES_OF_64_MB  # glibc maps and zero-fills them every time
    assert faults_of_the_last_three("cpu job") < PAGES_OF_64_MB // 20
