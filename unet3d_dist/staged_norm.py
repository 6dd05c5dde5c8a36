"""Group and instance norms for export, whose statistics an ONNX runtime computes as accurately as PyTorch does.

onnxruntime's CPU InstanceNormalization (which the exporter also turns GroupNorm into) sums a whole group in one
float32 pass: on a 128^3 window its output is off by up to 3e-3 (PyTorch: 5e-7), enough to move logits by more than
the export's check allows. ``StagedNorm`` takes the same mean and variance one axis at a time (z, y, x, then the
group's channels), so no single sum is longer than one side of the window: 5e-7 again, at the same speed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def staged_mean(grouped: torch.Tensor) -> torch.Tensor:
    """The mean of (N, G, C/G, X, Y, Z) over its last four axes, kept as size-1 axes, one axis at a time."""
    for axis in (5, 4, 3, 2):
        grouped = grouped.mean(axis, keepdim=True)
    return grouped


class StagedNorm(nn.Module):
    """``nn.GroupNorm`` (or ``nn.InstanceNorm3d``: a group per channel) with staged statistics, sharing the
    original's affine parameters."""

    def __init__(self, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.groups, self.eps, self.weight, self.bias = groups, eps, weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(-1, self.groups, x.shape[1] // self.groups, *x.shape[2:])
        centred = grouped - staged_mean(grouped)
        y = (centred / torch.sqrt(staged_mean(centred * centred) + self.eps)).reshape(x.shape)
        affine = (1, -1, 1, 1, 1)
        if self.weight is not None:
            y = y * self.weight.view(affine)
        return y + self.bias.view(affine) if self.bias is not None else y


def staged(norm: nn.Module) -> nn.Module:
    """``norm`` as a StagedNorm where it normalises over each sample's own voxels; any other module as it is."""
    if isinstance(norm, nn.GroupNorm):
        return StagedNorm(norm.num_groups, norm.weight, norm.bias, norm.eps)
    if isinstance(norm, nn.InstanceNorm3d) and not norm.track_running_stats:
        return StagedNorm(norm.num_features, norm.weight, norm.bias, norm.eps)
    return norm


def with_staged_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose group and instance norms are StagedNorms; ``model`` itself is left as it is."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            setattr(parent, name, staged(child))
    return model
