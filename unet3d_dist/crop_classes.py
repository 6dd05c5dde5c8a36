"""The share of training crops that hold each foreground class.

Foreground oversampling centres a crop on a class drawn uniformly from those a case holds, so that small organs
are trained on as often as large ones; this count shows whether it does. The counts stay on the training device
(no host synchronisation per step) and are averaged over ranks once an epoch.
"""

from __future__ import annotations

import torch

from .dist import mean_over_ranks
from .logger import RunLogger


class CropClasses:
    def __init__(self, classes: list[str], device: torch.device):
        self.classes = classes
        self.held = torch.zeros(len(classes), device=device)
        self.crops = 0

    def add(self, label: torch.Tensor) -> None:
        """Count the classes present in each crop of a (N, X, Y, Z) label batch on the training device."""
        label = label.flatten(1).long()
        present = torch.zeros(len(label), len(self.classes), device=self.held.device).scatter_(1, label, 1.0)
        self.held += present.sum(0)
        self.crops += len(label)

    def end_epoch(self, logger: RunLogger, step: int, epoch: int, show: bool) -> None:
        """Log each foreground class's share of this epoch's crops (over all ranks), and with ``show`` print them
        in one line, smallest first (the classes that oversampling might be missing lead); then start afresh."""
        shares = dict(zip(self.classes[1:], mean_over_ranks(self.held / max(self.crops, 1)).tolist()[1:]))
        self.held.zero_()
        self.crops = 0
        logger.log(step, {f"train/crops_with/{name}": share for name, share in shares.items()})
        if show:
            ordered = sorted(shares.items(), key=lambda item: item[1])
            logger.info(f"epoch {epoch}: crops holding each class: " + ", ".join(f"{n} {s:.0%}" for n, s in ordered))
