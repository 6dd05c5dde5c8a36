"""The training step and its optimizer on the real code path: non-finite steps, loss scaling, fused SGD."""

from __future__ import annotations

import pytest
import torch

from unet3d_dist.config import Config, OptimConfig
from unet3d_dist.model import ResUNet3D
from unet3d_dist.optim import build_optimizer
from unet3d_dist.step import TrainStep


def tiny_model() -> ResUNet3D:
    torch.manual_seed(0)
    return ResUNet3D(1, 2, (4, 8, 8, 16))


def batch(nan: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    image = torch.randn(2, 1, 24, 24, 24)  # CPU_BF16_MIN_CROP_SIDE: oneDNN's bf16 is wrong on smaller bottlenecks
    label = (image[:, 0] > 0.5).long()
    if nan:
        image[0, 0, 3, 3, 3] = float("nan")
    return image, label


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_a_non_finite_step_is_skipped_in_every_precision(amp):
    cfg = Config()
    cfg.train.amp = amp
    model = tiny_model()
    step = TrainStep(model, cfg, torch.device("cpu"), total_steps=100)
    before = weights(model)
    step(*batch(nan=True))
    assert int(step.nonfinite_run) == 1 and not torch.isfinite(step.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))  # not one weight moved, none went NaN
    step(*batch())
    assert int(step.nonfinite_run) == 0
    after = weights(model)
    assert all(torch.isfinite(p).all() for p in after) and not all(torch.equal(a, b) for a, b in zip(before, after))


def dirty_the_heap(model: torch.nn.Module) -> None:
    """Free blocks of the parameters' sizes full of huge values, so memory that is not initialised is not zeros."""
    garbage = [torch.full_like(p, 1e30) for p in model.parameters()]
    del garbage


def test_an_overflowing_first_fp16_step_leaves_fused_sgd_where_foreach_sgd_is():
    """Fused SGD used to make its momentum buffers with empty_like on the first step and keep them when the
    GradScaler skipped that step; the next step then read uninitialised memory."""
    settings = OptimConfig()
    runs = {}
    for kind in ("fused", "foreach"):
        model = tiny_model()
        if kind == "fused":
            optimizer = build_optimizer(list(model.parameters()), settings)
            assert optimizer.defaults["fused"]
        else:
            optimizer = torch.optim.SGD(
                model.parameters(),
                lr=settings.lr,
                momentum=settings.momentum,
                nesterov=True,
                weight_decay=settings.weight_decay,
                foreach=True,
            )
        scaler = torch.amp.GradScaler("cpu")
        for overflow in (True, False):
            optimizer.zero_grad(set_to_none=True)
            image, label = batch()
            loss = torch.nn.functional.cross_entropy(model(image), label)
            scaler.scale(loss).backward()
            if overflow:
                for p in model.parameters():
                    p.grad.fill_(float("inf"))
                dirty_the_heap(model)
            scaler.step(optimizer)
            scaler.update()
        runs[kind] = weights(model)
    for fused, foreach in zip(runs["fused"], runs["foreach"]):
        assert torch.allclose(fused, foreach, rtol=1e-5, atol=1e-7)
