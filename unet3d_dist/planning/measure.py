"""What this machine can afford, measured in the same run: autograd's memory per crop voxel and the step time.

Both are measured on the real network and the real training step (``step.TrainStep``) on random data, so a plan
made on an AVX2 CPU, an AVX-512 one or a GPU fits that machine. Both grow linearly with the crop's voxels (every
layer is a convolution over the whole crop), so one small measurement predicts any crop. The plan times one step
here, the reference step of ``budget.py``, and prices every other crop and network by its FLOPs against it.
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import torch

from ..config import Config
from ..dist import synchronize
from ..layout import choose_channels_last
from ..model import build_model, to_channels_last
from ..precision import resolve_amp
from ..step import TrainStep

MEMORY_OVERHEAD = 1.5  # allocator slack, workspaces and the transient gradients of activations, over saved tensors
PROBE_CROP = (48, 48, 32)


def saved_bytes_per_voxel(cfg: Config, in_channels: int, num_classes: int, device: torch.device) -> float:
    """Bytes of tensors autograd saves for backward, per crop voxel of one sample, in the run's precision."""
    model = build_model(cfg.model, in_channels, num_classes).to(device)
    step = TrainStep(model, cfg, device, total_steps=1)
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    image = torch.randn(1, in_channels, *PROBE_CROP, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=step.amp_dtype, enabled=step.amp_dtype is not None):
            model(image)
    return saved / math.prod(PROBE_CROP)


def step_seconds(cfg: Config, in_channels: int, num_classes: int, device: torch.device, steps: int = 5) -> float:
    """Median wall time of ``steps`` training steps at cfg's crop and batch, after two warm-up steps.

    The median, because one step that a neighbour's job or the allocator's first growth slows down would otherwise
    set the crop budget and the schedule: a mean of 3 steps once read 883 ms for a probe that takes 0.6-0.7 s alone.
    """
    model = build_model(cfg.model, in_channels, num_classes).to(device)
    amp_dtype = resolve_amp(cfg.train.amp, device, crop=cfg.data.crop)
    channels_last, _ = choose_channels_last(
        cfg.train.channels_last, device, cfg.model.widths[0], cfg.model.norm, amp_dtype
    )
    cfg = copy.deepcopy(cfg)
    cfg.train.channels_last = "on" if channels_last else "off"
    if channels_last:
        to_channels_last(model)
    step = TrainStep(model, cfg, device, total_steps=steps + 2)
    shape = (cfg.train.batch_size, *cfg.data.crop)
    image = torch.randn(shape[0], in_channels, *shape[1:], device=device)
    label = torch.randint(0, num_classes, shape, device=device)
    times = []
    for index in range(steps + 2):
        synchronize(device)
        start = time.perf_counter()
        step(image, label)
        synchronize(device)
        if index >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_budget_bytes(device: torch.device, given_gb: float | None) -> tuple[float, str]:
    """The memory a run may use: as given, else 85 % of the GPU's, else half of this machine's RAM."""
    if given_gb:
        return given_gb * 2**30, f"{given_gb:g} GiB as given (--memory-gb)"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return 0.85 * total, f"85 % of the GPU's {total / 2**30:.0f} GiB"
    total = _ram_bytes()
    return 0.5 * total, f"half of the {total / 2**30:.0f} GiB RAM; loader workers need the rest"


def _ram_bytes() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemTotal line")
