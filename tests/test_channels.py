"""Multi-channel scans end to end, on the real abdominal CT made two-channel: the HU in a soft-tissue window and the
same HU in a wide window, the second stored as NRRD with its axes flipped (case folders) or both in one 4-D NIfTI
(the Decathlon's way). prepare -> train (loader workers on, augmentation on) -> evaluate -> predict on two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import CT_LIVER, SHARED_DATA, TINY, free_port, recipe, train
from rich.console import Console

from unet3d_dist.config import ConfigError
from unet3d_dist.data.shards import ShardedDataset
from unet3d_dist.exit_codes import SOME_SKIPPED as EXIT_SKIPPED
from unet3d_dist.preparation.build import prepare
from unet3d_dist.preparation.recipe import load_recipe

pytestmark = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the real scans are not at {SHARED_DATA} (set UNET3D_SHARED_DATA)"
)
CT = SHARED_DATA / "ct_abdomen" / "image.nii.gz"
LABELS = SHARED_DATA / "ct_abdomen" / "labels.nii.gz"
WINDOWS = {"soft": [-200, 250], "wide": [-1000, 1000]}
TWO_CHANNELS = {
    "input": {"layout": "folders", "label": "labels*", "channels": {"soft": "soft*", "wide": "wide*"}},
    "preprocessing": {
        **CT_LIVER["preprocessing"],
        "spacing": [12, 12, 12],
        "crop": {"to": "none"},
        "normalization": {name: {"kind": "ct_window", "window": window} for name, window in WINDOWS.items()},
    },
    "splits": {"train": 0.5, "val": 0.5},
}


def flipped_copy(path: Path) -> Path:
    """The CT stored right-to-left and head-first (RAI instead of its own axes), as NRRD."""
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(CT)), "RAI"), str(path))
    return path


def four_d(path: Path) -> Path:
    """The CT twice, as the two volumes of one 4-D NIfTI on the CT's grid."""
    ct = sitk.ReadImage(str(CT), sitk.sitkFloat32)
    image = sitk.JoinSeries([ct, ct])
    spacing, origin, direction = ct.GetSpacing(), ct.GetOrigin(), np.array(ct.GetDirection()).reshape(3, 3)
    image.SetSpacing((*spacing, 1.0))
    image.SetOrigin((*origin, 0.0))
    full = np.eye(4)
    full[:3, :3] = direction
    image.SetDirection(full.ravel().tolist())
    sitk.WriteImage(image, str(path))
    return path


def case_folders(root: Path, count: int) -> Path:
    """``count`` case folders, each with the CT as ``soft.nii.gz`` and as a flipped ``wide.nrrd``, and the labels."""
    wide = flipped_copy(root / "wide.nrrd")
    for i in range(count):
        case = root / "cases" / f"case{i}"
        case.mkdir(parents=True)
        os.symlink(CT, case / "soft.nii.gz")
        os.symlink(wide, case / "wide.nrrd")
        os.symlink(LABELS, case / "labels.nii.gz")
    return root / "cases"


def run_prepare(config: Path, inputs: Path, out: Path) -> int:
    return prepare(
        load_recipe(config), [inputs], out, jobs=1, overwrite=False, split_file=None, console=Console(quiet=True)
    )


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("channels")
    dataset = tmp_path / "dataset"
    assert run_prepare(recipe(tmp_path, **TWO_CHANNELS), case_folders(tmp_path, 2), dataset) == 0
    return dataset


def single_channel(tmp_path: Path, window: list[int]) -> np.ndarray:
    """The CT prepared alone in ``window``, as the reference for one channel."""
    config = recipe(
        tmp_path,
        preprocessing={**TWO_CHANNELS["preprocessing"], "normalization": {"kind": "ct_window", "window": window}},
        splits={"train": 1.0, "val": 0.0},
    )
    folder = tmp_path / f"alone-{window[0]}" / "case0"
    folder.mkdir(parents=True)
    os.symlink(CT, folder / "image.nii.gz")
    os.symlink(LABELS, folder / "labels.nii.gz")
    assert run_prepare(config, folder.parent, tmp_path / f"single-{window[0]}") == 0
    return ShardedDataset(tmp_path / f"single-{window[0]}").image("case0")[0]


def test_each_channel_is_normalised_on_its_own_and_a_flipped_channel_is_brought_onto_the_first(two_channel, tmp_path):
    data = ShardedDataset(two_channel)
    assert data.channels == ["soft", "wide"] and data.manifest["channels"] == ["soft", "wide"]
    image = data.image("case0")
    assert image.shape == (2, *data.records["case0"]["shape"]) and image.dtype == np.float32
    for index, window in enumerate(WINDOWS.values()):
        np.testing.assert_allclose(image[index], single_channel(tmp_path, window), atol=1e-6)
    assert data.pad_values("case0") == pytest.approx([float(image[0].min()), float(image[1].min())])
    crop = data.image("case0", np.s_[2:9, 3:8, 4:6])
    np.testing.assert_array_equal(crop, image[:, 2:9, 3:8, 4:6])  # spatial indexing, all channels


def test_the_decathlons_4d_images_give_the_same_channels(two_channel, tmp_path):
    task = tmp_path / "Task01"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    for i in range(2):
        four_d(task / "imagesTr" / f"case{i}.nii.gz")
        os.symlink(LABELS, task / "labelsTr" / f"case{i}.nii.gz")
    (task / "dataset.json").write_text(json.dumps({"modality": {"0": "CT", "1": "CT"}}))
    config = recipe(tmp_path, **{**TWO_CHANNELS, "input": {"layout": "decathlon", "channels": ["soft", "wide"]}})
    assert run_prepare(config, task, tmp_path / "decathlon") == 0
    from_4d, from_folders = ShardedDataset(tmp_path / "decathlon"), ShardedDataset(two_channel)
    for case_id in ("case0", "case1"):
        np.testing.assert_allclose(from_4d.image(case_id), from_folders.image(case_id), atol=1e-6)


def test_a_channel_off_the_grid_or_a_wrong_channel_count_skips_the_case_with_one_sentence(tmp_path):
    cases = case_folders(tmp_path, 3)
    shifted = sitk.ReadImage(str(CT))
    shifted.SetOrigin([o + 30 for o in shifted.GetOrigin()])
    os.unlink(cases / "case1" / "wide.nrrd")
    sitk.WriteImage(shifted, str(cases / "case1" / "wide.nrrd"))
    os.unlink(cases / "case2" / "wide.nrrd")
    four_d(cases / "case2" / "wide.nii.gz")  # two volumes where one channel belongs
    out = tmp_path / "dataset"
    assert run_prepare(recipe(tmp_path, **TWO_CHANNELS), cases, out) == EXIT_SKIPPED
    skipped = {item["id"]: item["reason"] for item in json.loads((out / "manifest.json").read_text())["skipped"]}
    assert skipped["case1"].startswith(f"channel wide {cases / 'case1' / 'wide.nrrd'} is not on the grid of image ")
    assert "origin" in skipped["case1"]
    assert skipped["case2"] == (
        f"{cases / 'case2' / 'soft.nii.gz'} and {cases / 'case2' / 'wide.nii.gz'} hold 3 image channel(s); the "
        "recipe's input.channels names 2 (soft, wide), one file per channel in that order or one 4-D file"
    )
    assert ShardedDataset(out).case_ids() == ["case0"]


@pytest.mark.parametrize(
    "normalization, message",
    [
        ({"soft": {"kind": "zscore"}}, "preprocessing.normalization has no entry for channel 'wide'"),
        ({"soft": {"kind": "zscore"}, "wide": {"kind": "hu"}}, "preprocessing.normalization.wide must be a mapping"),
    ],
)
def test_a_normalization_that_misses_or_botches_a_channel_is_refused_naming_it(tmp_path, normalization, message):
    preprocessing = {**TWO_CHANNELS["preprocessing"], "normalization": normalization}
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe(tmp_path, **{**TWO_CHANNELS, "preprocessing": preprocessing}))


@pytest.fixture(scope="module")
def checkpoint(two_channel, tmp_path_factory) -> Path:
    """Two steps on the two-channel data with a loader worker, rotation, scaling and intensity changes."""
    runs = tmp_path_factory.mktemp("runs")
    command = [
        sys.executable,
        "-m",
        "unet3d_dist.train",
        f"data.dataset={two_channel}",
        f"log.runs_dir={runs}",
        "log.run_name=two",
        *TINY,
        "data.crop=[24,24,24]",
        "data.samples_per_epoch=4",
        "data.num_workers=1",
        "data.rotate_deg=15",
        "data.scale=0.1",
        "data.spatial_prob=1.0",
        "data.intensity_aug=true",
        "train.epochs=1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    path = runs / "two/checkpoints/ckpt-00000002.pt"
    state = torch.load(path, weights_only=True)
    assert state["model"]["encoders.0.conv1.weight"].shape[1] == 2  # the network reads both channels
    return path


def test_evaluate_scores_the_two_channel_model(checkpoint, two_channel, tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "unet3d_dist.evaluate", "--checkpoint", str(checkpoint)]
    command += ["--data", str(two_channel), "--split", "val", "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((out / "results.json").read_text())["cases"]
    assert [r["case"] for r in rows] == ShardedDataset(two_channel).case_ids("val")
    assert (out / "masks").is_dir() and any((out / "masks").iterdir())


def test_predict_takes_one_file_per_channel_or_one_4d_file_on_two_ranks(checkpoint, tmp_path):
    wide, stacked = flipped_copy(tmp_path / "wide.nrrd"), four_d(tmp_path / "both.nii.gz")
    out = tmp_path / "predictions"
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--master-port={free_port()}", "--nproc_per_node=2"]
    command = [*torchrun, "-m", "unet3d_dist.predict", "--checkpoint", str(checkpoint)]
    result = subprocess.run(
        [*command, f"{CT},{wide}", str(stacked), "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ct = sitk.ReadImage(str(CT))
    masks = [sitk.ReadImage(str(out / f"{name}_mask.nii.gz")) for name in ("image", "both")]
    for mask in masks:
        assert mask.GetSize() == ct.GetSize() and mask.GetOrigin() == pytest.approx(ct.GetOrigin(), abs=1e-4)
    # the same voxels, given as two files (one of them flipped) or as one 4-D file: the same mask
    assert np.array_equal(*(sitk.GetArrayFromImage(mask) for mask in masks))


def test_predict_refuses_a_missing_or_extra_channel_in_one_sentence(checkpoint, tmp_path):
    stacked = four_d(tmp_path / "both.nii.gz")
    command = [sys.executable, "-m", "unet3d_dist.predict", "--checkpoint", str(checkpoint), "--device", "cpu"]
    result = subprocess.run(
        [*command, str(CT), f"{stacked},{CT}", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == EXIT_SKIPPED, result.stdout + result.stderr
    expected = "the checkpoint was trained on 2 (soft, wide), one file per channel in that order or one 4-D file"
    assert sorted(result.stderr.splitlines()) == sorted(
        [
            f"skipped: {CT} holds 1 image channel(s); {expected}",
            f"skipped: {stacked} and {CT} hold 3 image channel(s); {expected}",
        ]
    )
    out = tmp_path / "out"
    assert not out.exists() or [p.name for p in out.iterdir()] == ["run.lock"]  # no mask: only the writer's lock


def test_resuming_on_data_with_other_channels_is_refused_naming_them(checkpoint, tiny_dataset, tmp_path):
    """The weights' first convolution reads two channels; resuming on one-channel data is refused first."""
    result = train(tmp_path, tiny_dataset, "log.run_name=one", f"train.resume={checkpoint}", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot resume from {checkpoint}" in result.stderr
    assert "dataset channels: ['soft', 'wide'] -> ['image']" in result.stderr
    assert not (tmp_path / "one").exists()  # the refused run leaves no run directory behind
