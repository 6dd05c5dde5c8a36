"""The resident data path (data.resident): the same crops as the loader workers' device path, the same resumes, and
finishing a batch that never reads a value back from the device."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from conftest import (
    assert_bitwise_equal,
    final_state,
    overrides,
    run,
    signal_job,
    start,
    trainer,
    wait_for,
    wait_until_gone,
)

from unet3d_dist.config import load_config
from unet3d_dist.data.crops import EpochSampler, training_crops, training_loader
from unet3d_dist.data.device_augment import collate_parts, finish_batch
from unet3d_dist.data.resident import ResidentCases, ResidentLoader, resident_bytes, resident_reason
from unet3d_dist.data.shards import ShardedDataset

CPU = torch.device("cpu")
AUGMENTED = (
    "data.rotate_deg=25",
    "data.scale=0.2",
    "data.spatial_prob=0.6",
    "data.intensity_aug=true",
    "data.flip_axes=xyz",
)
IDS = ["a", "b", "c", "d"]  # c is smaller than the crop: padded crops too


@pytest.fixture(scope="module")
def data(tiny_dataset):
    return ShardedDataset(tiny_dataset)


def config(*extra: str):
    return load_config(None, ["data.crop=[24,24,16]", "data.samples_per_epoch=24", "train.batch_size=4", *extra])


def sampler(cfg, epoch: int, skip: int = 0) -> EpochSampler:
    keys = EpochSampler(cfg.data.samples_per_epoch, 1, 0, cfg.train.seed)
    keys.set_epoch(epoch, skip)
    return keys


@pytest.mark.parametrize("flips", ["data.flip_axes=xyz", "data.flip_axes=none"])  # none: crops that are views
def test_resident_batches_are_the_workers_device_path_batches_bitwise_and_resume_at_the_next_crop(data, flips):
    cfg = config(*AUGMENTED, flips, "data.samples_per_epoch=26")  # 6 full batches of 4, and 2 crops dropped
    workers = training_loader(data, IDS, cfg, sampler(cfg, 3), 1, True, False, None)
    expected = [finish_batch(parts, cfg.data.crop, CPU) for parts in workers]
    resident = ResidentLoader(data, IDS, cfg, sampler(cfg, 3), CPU)
    got = list(resident)
    assert len(got) == len(expected) == len(resident) == 6
    for (image, label), (want_image, want_label) in zip(got, expected):
        assert image.shape == (4, 1, 24, 24, 16) and label.dtype == torch.uint8
        assert torch.equal(image, want_image) and torch.equal(label, want_label)
    resampled = sum(resident.crops[key]["resample"] for key in sampler(cfg, 3))
    assert 5 < resampled < 20  # rotated and scaled crops are among them, and plain ones
    resident.sampler.set_epoch(3, skip=2 * 4)  # a resume after two steps
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resident, got[2:], strict=True))


def test_resident_cases_hold_the_shards_voxels_on_the_device_and_auto_stays_off_on_a_cpu(data):
    cases = ResidentCases(data, IDS, CPU)
    nbytes = sum(cases.image(c).nbytes + cases.label(c).nbytes for c in IDS)
    assert resident_bytes(data, IDS) == nbytes
    region = np.s_[2:9, 3:7, 1:5]
    assert np.array_equal(cases.image("b", region).numpy(), data.image("b", region))
    assert np.array_equal(cases.label("b", region).numpy(), data.label("b", region))
    assert resident_reason("auto", CPU, nbytes) is None and resident_reason("off", CPU, nbytes) is None
    assert resident_reason("on", CPU, nbytes) == "data.resident=on"


def test_finishing_batches_reads_no_value_back_from_the_device_and_copies_once_per_batch(data):
    cfg = config(*AUGMENTED)
    crops = training_crops(data, IDS, cfg, finish_on_device=True)
    batches = [collate_parts([crops[(0, i + j)] for j in range(4)]) for i in range(0, 24, 4)]
    assert (
        any(batch["resample"].any() for batch in batches)
        and not np.isnan(np.stack([batch["intensity"] for batch in batches])).all()
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for batch in batches:
            finish_batch(batch, cfg.data.crop, CPU)
    names = [event.name for event in profile.events()]
    assert "aten::_local_scalar_dense" not in names  # what .item(), bool(), int() and .tolist() of a tensor call
    assert names.count("aten::lift_fresh") == len(batches)  # a tensor made from host values: the affine maps alone


def test_a_resident_run_killed_after_a_step_checkpoint_resumes_bitwise_equal(tmp_path, tiny_dataset):
    """The uninterrupted resident run also equals the loader workers' run on the device path: the same crops."""
    common = ("train.epochs=2", "checkpoint.every_steps=3", "checkpoint.keep_last=10", *AUGMENTED)
    extra = ("data.resident=on", *common)
    reference = run(trainer(1) + overrides(tiny_dataset, tmp_path, "reference", *extra))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert "data: resident on cpu (" in reference.stdout and "data.resident=on)" in reference.stdout
    workers = ("data.resident=off", "data.augment_device=device", "data.num_workers=1", *common)
    loaded = run(trainer(1) + overrides(tiny_dataset, tmp_path, "workers", *workers))
    assert loaded.returncode == 0 and "data: resident" not in loaded.stdout, loaded.stdout + loaded.stderr
    assert_bitwise_equal(final_state(tmp_path / "reference"), final_state(tmp_path / "workers"))

    command = trainer(1) + overrides(tiny_dataset, tmp_path, "killed", *extra)
    process = start(command)
    wait_for(tmp_path / "killed" / "checkpoints" / "ckpt-00000003.pt", process)
    pids = signal_job(process.pid, signal.SIGKILL)
    process.wait()
    wait_until_gone(pids, timeout=30)
    killed_at = final_state(tmp_path / "killed")["train_state"]["global_step"]
    assert killed_at < 8, "the run finished before it could be killed"
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at epoch" in resumed.stdout and f"step {killed_at}" in resumed.stdout
    assert_bitwise_equal(final_state(tmp_path / "reference"), final_state(tmp_path / "killed"))
