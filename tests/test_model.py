import pytest
import torch

from unet3d_dist.model import ResUNet3D, as_channels_last, count_parameters, forward_flops, to_channels_last


@pytest.mark.parametrize("shape", [(8, 8, 8), (16, 24, 32), (40, 16, 8)])
def test_logits_keep_the_input_shape(shape):
    model = ResUNet3D(in_channels=1, num_classes=3, widths=(4, 8, 8, 16))
    out = model(torch.randn(2, 1, *shape))
    assert out.shape == (2, 3, *shape)


@pytest.mark.parametrize(("widths", "side"), [((4, 8, 8), 4), ((4, 4, 8, 8, 8, 16), 32)])
def test_the_depth_follows_the_widths_and_sets_the_side_divisor(widths, side):
    model = ResUNet3D(widths=widths, deep_supervision=True)
    assert len(model.encoders) == len(widths) and model.divisor == side
    outputs = model(torch.randn(1, 1, side, 2 * side, side))
    sum(o.square().mean() for o in outputs).backward()  # every head is used: DDP refuses unused parameters
    assert all(p.grad is not None for p in model.parameters())
    full, half, quarter = [(side // k, 2 * side // k, side // k) for k in (1, 2, 4)]
    assert [o.shape[2:] for o in outputs] == ([full, half] if len(widths) == 3 else [full, half, quarter])
    with pytest.raises(ValueError, match=f"divisible by {side}"):
        model(torch.randn(1, 1, side + side // 2, side, side))


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


def test_channels_last_reaches_the_first_level_from_a_one_channel_image():
    # .contiguous(memory_format=...) keeps NCDHW strides for one channel, and the first block then ran in NCDHW.
    model = to_channels_last(ResUNet3D(widths=(8, 8, 8, 8)))
    image = torch.randn(2, 1, 16, 16, 8)  # with one image, torch reads the batch as NCDHW whatever its strides
    assert image.contiguous(memory_format=torch.channels_last_3d).stride(1) != 1
    first = model.encoders[0]
    for tensor in (as_channels_last(image), first.conv1.weight):
        assert tensor.is_contiguous(memory_format=torch.channels_last_3d) and tensor.stride(1) == 1
    assert (
        torch.equal(as_channels_last(image), image) and as_channels_last(image).data_ptr() == image.data_ptr()
    )  # a view
    for out in (
        first.conv1(as_channels_last(image)),
        first.shortcut(as_channels_last(image)),
        first(as_channels_last(image)),
    ):
        assert out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous()


@pytest.mark.parametrize("threads", [1, 2])
def test_every_gradient_has_its_parameters_strides(threads):
    # DDP's buckets take the parameters' strides and copy (and warn) for any gradient that differs. With several
    # threads oneDNN gives 1x1x1 conv weights channels-last gradients, with one thread the native kernel does not.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = to_channels_last(ResUNet3D(widths=(4, 8, 8, 16)))
        model(as_channels_last(torch.randn(2, 1, 16, 16, 8))).sum().backward()
    finally:
        torch.set_num_threads(before)
    mismatched = {
        name: (p.stride(), p.grad.stride()) for name, p in model.named_parameters() if p.stride() != p.grad.stride()
    }
    assert not mismatched
