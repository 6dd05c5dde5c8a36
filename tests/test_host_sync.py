"""No host synchronisation in a training step: 5 steps of the real Trainer (a loader worker, device augmentation with
rotation, scaling and intensity changes) make no host read of a tensor value, and the check sees one when it is
there."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from unet3d_dist.bench.gpu import trainer_in
from unet3d_dist.bench.host_sync import HOST_READ, host_reads_in_steps
from unet3d_dist.config import load_config


def augmented_trainer(tmp_path, dataset, name: str, *extra: str):
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.dataset={dataset}",
            f"log.runs_dir={tmp_path}",
            f"log.run_name={name}",
            "data.num_workers=1",
            "data.augment_device=device",
            "data.rotate_deg=20",
            "data.scale=0.2",
            "data.spatial_prob=1",
            "data.intensity_aug=true",
            "data.samples_per_epoch=16",
            *extra,
        ],
    )
    return trainer_in(cfg, torch.device("cpu"))


@pytest.mark.parametrize("global_batch", [2, 4])  # 4: two micro-batches accumulated per step
def test_five_training_steps_read_nothing_back_from_the_device(tmp_path, tiny_dataset, global_batch):
    with augmented_trainer(tmp_path, tiny_dataset, "quiet", f"train.global_batch={global_batch}") as trainer:
        assert trainer.accumulate == global_batch // 2
        assert host_reads_in_steps(trainer, steps=5) == []


def test_the_check_sees_a_step_that_reads_its_loss(tmp_path, tiny_dataset):
    with augmented_trainer(tmp_path, tiny_dataset, "chatty") as trainer:
        accumulate = trainer.step.accumulate
        trainer.step.accumulate = lambda batches: accumulate(batches).item()  # a per-step print of the loss does this
        assert host_reads_in_steps(trainer, steps=5) == [HOST_READ] * 5
