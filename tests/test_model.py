import pytest
import torch

from unet3d_dist.model import ResUNet3D, count_parameters, forward_flops


@pytest.mark.parametrize("shape", [(8, 8, 8), (16, 24, 32), (40, 16, 8)])
def test_logits_keep_the_input_shape(shape):
    model = ResUNet3D(in_channels=1, num_classes=3, widths=(4, 8, 8, 16))
    out = model(torch.randn(2, 1, *shape))
    assert out.shape == (2, 3, *shape)


def test_gradients_reach_every_parameter():
    model = ResUNet3D(in_channels=1, num_classes=2, widths=(4, 8, 8, 16), deep_supervision=True)
    outputs = model(torch.randn(2, 1, 16, 16, 16))
    sum(o.square().mean() for o in outputs).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_channel_changes_use_a_projection_not_broadcasting():
    model = ResUNet3D(in_channels=1, num_classes=2, widths=(4, 8, 8, 16))
    first = model.encoders[0]
    assert isinstance(first.shortcut, torch.nn.Conv3d) and first.shortcut.kernel_size == (1, 1, 1)
    assert first.shortcut.in_channels == 1 and first.shortcut.out_channels == 4
    assert all(isinstance(d.shortcut, torch.nn.Conv3d) for d in model.decoders)


def test_deep_supervision_outputs_in_training_only():
    model = ResUNet3D(num_classes=2, widths=(4, 8, 8, 16), deep_supervision=True)
    shapes = [tuple(o.shape[2:]) for o in model(torch.randn(1, 1, 16, 16, 32))]
    assert shapes == [(16, 16, 32), (8, 8, 16), (4, 4, 8)]
    model.eval()
    assert model(torch.randn(1, 1, 16, 16, 32)).shape == (1, 2, 16, 16, 32)


@pytest.mark.parametrize("norm", ["instance", "group", "batch"])
def test_every_norm_builds_and_runs(norm):
    model = ResUNet3D(widths=(8, 8, 16, 16), norm=norm)
    assert model(torch.randn(2, 1, 16, 16, 16)).shape == (2, 2, 16, 16, 16)


def test_sides_not_divisible_by_8_are_refused_clearly():
    model = ResUNet3D(widths=(4, 8, 8, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 1, 16, 12, 16))


def test_default_model_size_and_flops():
    model = ResUNet3D()
    params = count_parameters(model)
    flops = forward_flops(model, (112, 112, 80))
    assert 1.5e6 < params < 2.5e6
    # Dominated by the 16-channel 3x3x3 convolutions at full resolution: ~100+ GFLOP per crop.
    assert 80e9 < flops < 200e9
