"""Mixed precision: which autocast dtype a run uses, decided once for train, evaluate and predict alike."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

AMP_MODES = ("auto", "bf16", "fp16", "off")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# x86 instructions that compute bf16 dot products in hardware. Without them oneDNN emulates bf16 convolutions:
# on an AVX2 EPYC one bf16 training step took minutes against 1.4 s in fp32.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


# oneDNN's bf16 weight gradients of a conv3d on a 2x2x2 (or 2x2x1) input differ from run to run, now and then inf
# (torch 2.13, Zen 4); the UNet's bottleneck is that small for crop sides of 16. Training in bf16 on a CPU therefore
# starts at crop sides of 3 bottleneck voxels.
CPU_BF16_MIN_CROP_SIDE = 24


def resolve_amp(
    mode: str, device: torch.device, cpu_flags: Iterable[str] | None = None, crop: Sequence[int] | None = None
) -> torch.dtype | None:
    """auto: bf16 on GPUs with bf16 tensor cores, fp16 on other GPUs; on a CPU bf16 where it has bf16 dot-product
    instructions (``cpu_flags``, read from /proc/cpuinfo when not given) and, for training, the ``crop`` has no side
    under CPU_BF16_MIN_CROP_SIDE; none otherwise."""
    if mode == "off":
        return None
    if mode == "auto" and device.type == "cpu":
        big_enough = crop is None or min(crop) >= CPU_BF16_MIN_CROP_SIDE
        return torch.bfloat16 if big_enough and fast_cpu_bf16(cpu_flags) else None
    if mode == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def fast_cpu_bf16(cpu_flags: Iterable[str] | None = None) -> bool:
    """Whether bf16 convolutions run in hardware on this CPU (AVX512-BF16 or AMX, as on Zen 4 and Sapphire Rapids)."""
    flags = set(read_cpu_flags() if cpu_flags is None else cpu_flags)
    return bool(flags & CPU_BF16_FLAGS) and torch.backends.mkldnn.is_available()


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as Linux reports them; empty where there is no /proc/cpuinfo (fp32 then)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware (compute capability 8.0, Ampere, and newer). ``torch.cuda.is_bf16_supported()`` also says yes
    where bf16 is only emulated (V100, T4), which runs several times slower than fp16 there."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def amp_name(dtype: torch.dtype | None) -> str:
    """The config's name of an autocast dtype: bf16, fp16 or off."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")
