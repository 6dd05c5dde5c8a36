"""Sliding-window stitching with a model whose output is known: it echoes its input as logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unet3d_dist.inference import sliding_window_logits


def predict_labels(logits: torch.Tensor):
    return logits.argmax(0).to(torch.uint8).numpy()


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
    logits = sliding_window_logits(
        Echo(), image, patch, 2, overlap=overlap, batch_size=3, pad_value=-5.0, tta_axes=(0, 1, 2) if flips else ()
    )
    assert logits.shape == (2, *shape)
    torch.testing.assert_close(logits, torch.cat([-image, image]), rtol=1e-5, atol=1e-5)
    labels = predict_labels(logits)
    assert labels.shape == shape and (labels == (image[0] > 0).numpy()).all()


def test_largest_component_keeps_one_object_per_class():
    import numpy as np

    from unet3d_dist.components import keep_largest_component

    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 1  # 216 voxels: kept
    labels[12:14, 12:14, 12:14] = 1  # 8 voxels: dropped
    labels[15:18, 2:5, 2:5] = 2  # the only class-2 object: kept
    labels[9, 9, 9] = 2  # touches nothing: dropped
    out = keep_largest_component(labels)
    assert (out[2:8, 2:8, 2:8] == 1).all() and (out[12:14, 12:14, 12:14] == 0).all()
    assert (out[15:18, 2:5, 2:5] == 2).all() and out[9, 9, 9] == 0
    assert out.sum() == 216 + 2 * 27
    corner = np.zeros((6, 6, 6), np.uint8)
    corner[0:2, 0:2, 0:2] = corner[2:5, 2:5, 2:5] = 1  # two cubes touching at one corner only
    assert (keep_largest_component(corner) == corner).all()  # 26-connected: one object
    assert keep_largest_component(corner, connectivity=6).sum() == 27  # 6-connected: the small cube goes


def test_resampling_to_another_grid_keeps_a_smooth_volume():
    from unet3d_dist.inference import resample_to_shape

    ramp = torch.linspace(0, 1, 20).reshape(1, 20, 1, 1).expand(2, 20, 6, 4)
    coarse = resample_to_shape(ramp, (10, 3, 2))
    fine = resample_to_shape(coarse, (20, 6, 4))
    assert coarse.shape == (2, 10, 3, 2) and fine.shape == (2, 20, 6, 4)
    assert torch.allclose(fine[:, 3:-3], ramp[:, 3:-3], atol=1e-6)  # linear data survives away from the borders


def random_classes(num_classes: int) -> nn.Module:
    """A fixed random 3x3x3 convolution to ``num_classes`` logits: windows see their neighbourhood, so they disagree."""
    torch.manual_seed(1)
    return nn.Conv3d(1, num_classes, 3, padding=1).eval()


@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [
        ((37, 29, 21), (16, 16, 8), 0.5),  # sides that are no multiple of the step
        ((45, 20, 19), (12, 16, 8), 0.25),  # overlap 0.25, a step that does not divide the patch
        ((11, 30, 5), (16, 16, 8), 0.5),  # smaller than the patch along two axes, x among them
        ((7, 6, 5), (16, 16, 8), 0.25),  # smaller than the patch everywhere
    ],
)
def test_streamed_stitching_equals_full_volume_stitching(shape, patch, overlap):
    from unet3d_dist.bench.eval import full_volume_logits
    from unet3d_dist.inference import sliding_window_labels

    model, image = random_classes(5), torch.randn(1, *shape)
    reference = full_volume_logits(model, image, patch, 5, overlap, batch=3)
    logits = sliding_window_logits(model, image, patch, 5, overlap=overlap, batch_size=3)
    assert torch.equal(logits, reference)
    labels = sliding_window_labels(model, image, patch, 5, overlap=overlap, batch_size=3)
    assert (labels == predict_labels(reference)).all()


def test_streamed_stitching_keeps_only_one_patch_of_planes():
    from unet3d_dist.inference import sliding_window_slabs

    shape, patch, classes = (60, 20, 12), (10, 8, 8), 4
    planes = []
    for x, slab in sliding_window_slabs(random_classes(classes), torch.randn(1, *shape), patch, classes, overlap=0.5):
        assert slab.untyped_storage().nbytes() == classes * patch[0] * 20 * 12 * 4  # the ring, not the volume
        planes.extend(range(x, x + slab.shape[1]))
    assert planes == list(range(shape[0]))  # every plane once, in order


def test_ensemble_probabilities_streamed_equal_the_whole_volume_mean():
    from unet3d_dist.bench.eval import full_volume_logits
    from unet3d_dist.inference import sliding_window_slabs
    from unet3d_dist.segmenter import softmax
    from unet3d_dist.windows import labels_from_slabs, mean_probability_slabs

    image, shape = torch.randn(1, 41, 23, 17), (41, 23, 17)
    members = [(random_classes(4), (16, 16, 8)), (nn.Conv3d(1, 4, 1).eval(), (10, 12, 8))]  # slabs cut differently
    whole = [full_volume_logits(model, image, patch, 4, 0.5, batch=2) for model, patch in members]
    expected = (whole[0].softmax(0) + whole[1].softmax(0)) / 2
    streams = [sliding_window_slabs(model, image, patch, 4, overlap=0.5, batch_size=2) for model, patch in members]
    streams[1] = iter([(0, whole[1])])  # a resampled member: its whole volume as one slab
    got = torch.cat([slab for _, slab in mean_probability_slabs(streams, softmax)], dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    streams = [sliding_window_slabs(model, image, patch, 4, overlap=0.5, batch_size=2) for model, patch in members]
    assert (labels_from_slabs(shape, mean_probability_slabs(streams, softmax)) == predict_labels(expected)).all()
