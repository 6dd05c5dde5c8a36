"""Residual 3D UNet returning logits at the input's resolution."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .config import MAX_LEVELS, MIN_LEVELS, ModelConfig, side_divisor


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 8), channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"model.norm must be instance, group or batch, not {kind!r}")


class ResBlock(nn.Module):
    """Two 3x3x3 conv-norm layers plus an identity (or 1x1x1 projection when channels change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1, bias=False)
        )
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class ResUNet3D(nn.Module):
    """Residual UNet with one level per entry of ``widths`` (4 by default): strided-conv down, transposed-conv up,
    skip concatenation.

    Returns logits of shape (N, num_classes, X, Y, Z); with deep supervision in training mode, a list of logits at
    full, 1/2 and (from 4 levels on) 1/4 resolution, full first. Sides must be divisible by 2^(levels - 1): 8 for 4.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        norm: str = "group",
        deep_supervision: bool = False,
    ):
        super().__init__()
        if not MIN_LEVELS <= len(widths) <= MAX_LEVELS:
            raise ValueError(f"model.widths needs {MIN_LEVELS} to {MAX_LEVELS} entries, got {list(widths)}")
        self.levels, self.divisor = len(widths), side_divisor(len(widths))
        self.deep_supervision = deep_supervision
        self.encoders = nn.ModuleList(
            ResBlock(in_channels if i == 0 else widths[i], widths[i], norm) for i in range(self.levels)
        )
        self.downs = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(widths[i], widths[i + 1], 2, stride=2, bias=False),
                make_norm(norm, widths[i + 1]),
                nn.LeakyReLU(0.01, inplace=True),
            )
            for i in range(self.levels - 1)
        )
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2, bias=False) for i in range(self.levels - 1)
        )
        self.decoders = nn.ModuleList(ResBlock(2 * widths[i], widths[i], norm) for i in range(self.levels - 1))
        # Heads for levels 0 (full resolution), 1 and 2 (the decoder's levels only: a 3-level network has two); the
        # coarser ones only feed deep supervision.
        heads = min(3, self.levels - 1) if deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv3d(widths[i], num_classes, 1) for i in range(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        bad = [s for s in x.shape[2:] if s % self.divisor]
        if x.dim() != 5 or bad:
            raise ValueError(
                f"ResUNet3D needs input of shape (N, C, X, Y, Z) with X, Y, Z divisible by {self.divisor}; got "
                f"{tuple(x.shape)}"
            )
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.encoders[-1](x)
        outputs = []
        for level in reversed(range(self.levels - 1)):
            x = self.decoders[level](torch.cat([self.ups[level](x), skips[level]], dim=1))
            if level < len(self.heads) and (level == 0 or self.training):
                outputs.append(self.heads[level](x))
        if self.deep_supervision and self.training:
            return outputs[::-1]
        return outputs[-1]


def as_channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with explicit channels_last_3d strides, also when it has a single channel.

    ``.contiguous(memory_format=torch.channels_last_3d)`` leaves a one-channel tensor (an image batch, the first
    conv's weight) with its NCDHW strides, since both layouts describe it. Convolutions then run the first level
    in NCDHW and copy between layouts: 10 % of a CPU training step at 112x112x80. With one channel the memory is
    the same in both layouts, so only the channel stride changes: a view, no copy.
    """
    tensor = tensor.contiguous(memory_format=torch.channels_last_3d)
    if tensor.size(1) == 1 and tensor.stride(1) != 1:
        return tensor.as_strided(tensor.shape, (tensor.stride(0), 1, *tensor.stride()[2:]))
    return tensor


def to_channels_last(model: nn.Module) -> nn.Module:
    """channels_last_3d for every conv weight except 1x1x1 kernels (whose two layouts are the same memory), and
    gradients that keep their parameter's strides (see ``grad_with_strides``)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) and module.weight.shape[2:] != (1, 1, 1):
            module.weight.data = as_channels_last(module.weight.data)
    for param in model.parameters():
        param.register_hook(functools.partial(grad_with_strides, param.stride()))  # strides, not the param: no cycle
    return model


def grad_with_strides(strides: tuple[int, ...], grad: torch.Tensor) -> torch.Tensor | None:
    """``grad`` viewed with its parameter's ``strides`` where the two differ only in size-1 dims (the same memory).

    Which strides a convolution gives a weight's gradient in such dims depends on the backend and the thread count
    (oneDNN channels-last with several threads, the native kernel with one). Autograd accepts either, but DDP's
    gradient buckets copy, and warn, whenever a gradient's strides differ from its parameter's.
    """
    if grad.stride() == strides:
        return None
    dense = grad.is_contiguous() or (grad.dim() == 5 and grad.is_contiguous(memory_format=torch.channels_last_3d))
    if dense and all(g == p for g, p, size in zip(grad.stride(), strides, grad.shape) if size != 1):
        return grad.as_strided(grad.shape, strides)  # addresses exactly what grad does: the same dense layout
    return None


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> ResUNet3D:
    return ResUNet3D(in_channels, num_classes, cfg.widths, cfg.norm, cfg.deep_supervision)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, shape: tuple[int, int, int], in_channels: int = 1) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on a single crop, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_channels, *shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    return counter.get_total_flops()
