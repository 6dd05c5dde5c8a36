"""SGD with Nesterov momentum and the LR schedules of the run (poly, step, constant)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import OptimConfig


def lr_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the initial LR at a given optimizer step."""
    if cfg.schedule == "poly":
        return lambda step: (1 - min(step, total_steps) / total_steps) ** cfg.poly_power
    if cfg.schedule == "step":
        return lambda step: cfg.step_gamma ** (step // cfg.step_every)
    return lambda step: 1.0


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.SGD:
    """Fused SGD (one kernel, and the GradScaler can skip steps without a host sync); foreach where unsupported.

    The momentum buffers start as zeros rather than at the first step: fused SGD creates them uninitialised on its
    first step and keeps them when the GradScaler skips that step (found_inf), so a first step that overflows would
    leave garbage for the second. From zeros, the first update is the gradient itself, as SGD's first step is.
    """
    settings = dict(
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )
    params = list(params)
    try:
        optimizer = torch.optim.SGD(params, fused=True, **settings)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.SGD(params, foreach=True, **settings)
    if cfg.momentum > 0:
        for param in params:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return optimizer


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))
