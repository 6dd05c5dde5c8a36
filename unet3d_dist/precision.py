"""Mixed precision: which autocast dtype a run uses, decided once for train, evaluate and predict alike."""

from __future__ import annotations

import torch

AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on GPUs that support it, fp16 on other GPUs, none on CPU."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def amp_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "off"
