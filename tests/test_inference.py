"""Sliding-window stitching with a model whose output is known: it echoes its input as logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unet3d_dist.inference import predict_labels, sliding_window_logits


class Echo(nn.Module):
    """Logits (-x, x): every window's output is the input it saw, so stitching must give back the volume."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1)


@pytest.mark.parametrize(
    ("shape", "patch", "overlap", "flips"),
    [
        ((37, 29, 21), (16, 16, 8), 0.5, False),  # sides that are no multiple of the step
        ((40, 24, 17), (16, 24, 8), 0.25, True),  # one side exactly the patch, flip TTA
        ((11, 30, 5), (16, 16, 8), 0.5, False),  # smaller than the patch along two axes
        ((7, 6, 5), (16, 16, 8), 0.5, True),  # smaller than the patch everywhere
    ],
)
def test_stitching_reconstructs_the_echoed_volume(shape, patch, overlap, flips):
    image = torch.randn(1, *shape)
    logits = sliding_window_logits(Echo(), image, patch, 2, overlap=overlap, batch_size=3, pad_value=-5.0, tta_flips=flips)
    assert logits.shape == (2, *shape)
    torch.testing.assert_close(logits, torch.cat([-image, image]), rtol=1e-5, atol=1e-5)
    labels = predict_labels(logits)
    assert labels.shape == shape and (labels == (image[0] > 0).numpy()).all()

