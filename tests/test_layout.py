"""train.channels_last: what auto resolves to, and the probe that decides it on GPUs (run here on the CPU)."""

from __future__ import annotations

import torch

from unet3d_dist.layout import choose_channels_last, probe_channels_last


def test_auto_is_channels_last_on_cpus_and_explicit_settings_win():
    cpu = torch.device("cpu")
    assert choose_channels_last("auto", cpu, 8, "group", None) == (True, "auto: on, the faster format on CPUs")
    assert choose_channels_last("on", cpu, 8, "group", None)[0] is True
    assert choose_channels_last("off", cpu, 8, "group", None) == (False, "train.channels_last=off")


def test_the_probe_times_forward_and_backward_of_one_block_in_both_formats():
    seconds = probe_channels_last(4, "group", None, torch.device("cpu"), repeat=2)
    assert set(seconds) == {"channels_last_3d", "contiguous"} and all(s > 0 for s in seconds.values())
