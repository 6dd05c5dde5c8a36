"""The memory format a run trains in: channels_last_3d or contiguous, chosen by ``train.channels_last``.

On CPUs channels_last_3d is the faster format (1.55x for our step in ``bench train_step``), so ``auto`` is on there.
On CUDA it depends on the GPU and the kernels: the convolutions gain, but a norm layer may copy its input into the
other layout and back. ``auto`` then times both on the first rank, forward and backward of one residual block of the
run's widths, and every rank takes that rank's answer. The resolved value is stored with the run's config, so a
resumed run keeps its format.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .model import ResBlock, as_channels_last, to_channels_last

PROBE_SIDE = 32  # voxels per side of the probe's input: big enough to time, a few ms on a GPU


def median_seconds(fn: Callable[[], None], device: torch.device, repeat: int) -> float:
    """Median wall seconds of ``fn`` after one warm-up call, the device's queued work included."""
    times = []
    for i in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_channels_last(
    width: int, norm: str, amp_dtype: torch.dtype | None, device: torch.device, repeat: int = 5
) -> dict[str, float]:
    """Median seconds of forward + backward of one residual block (``width`` channels) in each memory format."""
    seconds = {}
    for name, channels_last in (("channels_last_3d", True), ("contiguous", False)):
        torch.manual_seed(0)
        block = ResBlock(width, width, norm).to(device)
        x = torch.randn(2, width, PROBE_SIDE, PROBE_SIDE, PROBE_SIDE, device=device)
        if channels_last:
            to_channels_last(block)
            x = as_channels_last(x)
        x.requires_grad_(True)

        def step(block=block, x=x) -> None:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = block(x)
            out.float().sum().backward()

        seconds[name] = median_seconds(step, device, repeat)
    return seconds


def choose_channels_last(
    setting: str, device: torch.device, width: int, norm: str, amp_dtype: torch.dtype | None
) -> tuple[bool, str]:
    """Whether to train in channels_last_3d, and why, in a few words for the run's console."""
    if setting != "auto":
        return setting == "on", f"train.channels_last={setting}"
    if device.type != "cuda":
        return True, "auto: on, the faster format on CPUs"
    with torch.random.fork_rng(devices=[device]):  # the run's generators stay as the ranks that do not probe have them
        seconds = probe_channels_last(width, norm, amp_dtype, device)
    faster = min(seconds, key=seconds.get)
    timings = ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in seconds.items())
    return faster == "channels_last_3d", f"auto: {faster} was faster in a probe of one block ({timings})"
