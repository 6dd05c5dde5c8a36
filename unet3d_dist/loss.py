"""Dice + cross-entropy on logits against integer labels.

Conventions (documented in the README):
- softmax is applied once, here, to the logits; cross-entropy uses ``log_softmax`` of the same logits;
- Dice is soft Dice ``(2*tp + s) / (2*tp + fp + fn + s)`` with ``s = loss.smooth`` (1e-5) for numerical safety;
- by default the background class is left out of the Dice mean and Dice is pooled over the batch;
- a class with no voxel in the reference (of the batch, or of the sample when ``batch_dice`` is off) is left out
  of the Dice mean, so crops without foreground are trained by cross-entropy alone instead of by a Dice term that
  would be 0 whatever the prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig


class DiceCELoss(nn.Module):
    def __init__(
        self,
        dice_weight: float = 0.5,
        ce_weight: float = 0.5,
        include_background: bool = False,
        batch_dice: bool = True,
        smooth: float = 1e-5,
    ):
        super().__init__()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits: (N, C, X, Y, Z) float; labels: (N, X, Y, Z) integer class ids."""
        logits = logits.float()
        labels = labels.long()
        ce = F.cross_entropy(logits, labels)
        if self.dice_weight == 0:
            return self.ce_weight * ce
        return self.dice_weight * self.dice_loss(logits.softmax(dim=1), labels) + self.ce_weight * ce

    def dice_loss(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # scatter, not F.one_hot: one_hot reads the labels' min and max on the host to check them (a sync per step)
        onehot = torch.zeros_like(probs).scatter_(1, labels.unsqueeze(1), 1.0)
        if not self.include_background:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        dims = (0, 2, 3, 4) if self.batch_dice else (2, 3, 4)
        tp = (probs * onehot).sum(dims)
        pred_sum = probs.sum(dims)
        ref_sum = onehot.sum(dims)
        dice = (2 * tp + self.smooth) / (pred_sum + ref_sum + self.smooth)
        present = (ref_sum > 0).to(dice.dtype)  # a mask, not indexing: no host synchronisation per step
        return ((1 - dice) * present).sum() / present.sum().clamp(min=1)


class DeepSupervisionLoss(nn.Module):
    """Weights 1, 1/2, 1/4 (normalised) over full, 1/2 and 1/4 resolution outputs; labels are subsampled."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: list[torch.Tensor] | torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, labels)
        weights = [0.5**i for i in range(len(outputs))]
        total = sum(weights)
        loss = 0.0
        for i, (out, w) in enumerate(zip(outputs, weights)):
            step = 2**i
            loss = loss + (w / total) * self.loss(out, labels[:, ::step, ::step, ::step])
        return loss


def build_loss(cfg: LossConfig, deep_supervision: bool) -> nn.Module:
    loss = DiceCELoss(cfg.dice_weight, cfg.ce_weight, cfg.include_background, cfg.batch_dice, cfg.smooth)
    return DeepSupervisionLoss(loss) if deep_supervision else loss
