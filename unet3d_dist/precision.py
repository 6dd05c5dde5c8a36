"""Mixed precision: which autocast dtype a run uses, decided once for train, evaluate and predict alike."""

from __future__ import annotations

import torch

AMP_MODES = ("auto", "bf16", "fp16", "off")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on GPUs with bf16 tensor cores, fp16 on other GPUs, none on CPU."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware (compute capability 8.0, Ampere, and newer). ``torch.cuda.is_bf16_supported()`` also says yes
    where bf16 is only emulated (V100, T4), which runs several times slower than fp16 there."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def amp_name(dtype: torch.dtype | None) -> str:
    """The config's name of an autocast dtype: bf16, fp16 or off."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")
