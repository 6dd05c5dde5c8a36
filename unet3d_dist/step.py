"""The training step: one unit that the Trainer runs and the benchmarks time, so both measure the same work."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .config import Config
from .loss import build_loss
from .model import as_channels_last
from .optim import build_optimizer, build_scheduler
from .precision import resolve_amp


class TrainStep:
    """One optimizer step on one batch: forward under autocast, Dice + cross-entropy, backward through the
    GradScaler, gradient clipping, a count of non-finite steps, the optimizer step and the LR schedule.

    Nothing in it waits for the device. ``net`` is what runs the forward pass (the model, or DDP / torch.compile
    around it, set by the caller); the optimizer and clipping work on ``model``'s parameters.
    """

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device, total_steps: int):
        self.model = self.net = model
        self.device = device
        self.channels_last = cfg.train.channels_last == "on"  # "auto" is resolved by the caller (layout.py)
        self.amp_dtype = resolve_amp(cfg.train.amp, device, crop=cfg.data.crop)
        self.loss_fn = build_loss(cfg.loss, cfg.model.deep_supervision)
        self.optimizer = build_optimizer(list(model.parameters()), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps)
        # Every precision goes through a GradScaler: fp16 to scale the loss, all of them for its non-finite check,
        # which fused SGD reads on the device to skip the step. Without it a NaN gradient would reach the weights
        # through clipping in bf16 and fp32. Outside fp16 the scale starts at 1 and only ever halves (exact).
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=2.0**16 if fp16 else 1.0, growth_interval=2000 if fp16 else 2**31 - 1
        )
        self.grad_clip = cfg.optim.grad_clip or math.inf
        self.grad_norm = torch.zeros((), device=device)
        self.nonfinite_run = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps in a row

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The step on one batch; returns the (detached) loss without a host synchronisation."""
        return self.accumulate([(image, label)])

    def accumulate(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over micro-batches (each a group whose Dice pools its crops), the loss the mean of
        theirs; returns it (detached) without a host synchronisation. Under DDP only the last backward all-reduces.

        A step whose gradients are not finite is skipped, in every precision; ``nonfinite_run`` counts such steps
        on the device, so the caller checks it only at logging intervals and before checkpoints.
        """
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for i, (image, label) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync():
                loss = self.loss(image, label)
                if len(micro_batches) > 1:
                    loss = loss / len(micro_batches)
                self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.scaler.unscale_(self.optimizer)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        # Gradients are all-reduced already, so every rank counts the same.
        self.nonfinite_run = torch.where(torch.isfinite(self.grad_norm), 0, self.nonfinite_run + 1)
        self.scaler.step(self.optimizer)  # fused SGD reads the scaler's found_inf on the device: no .item()
        self.scaler.update()
        self.scheduler.step()
        return total

    def loss(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Forward under autocast and the loss of one micro-batch."""
        image = image.to(self.device, non_blocking=True)
        if self.channels_last:
            image = as_channels_last(image)
        label = label.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.net(image)
        return self.loss_fn(outputs, label)
