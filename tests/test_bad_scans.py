"""``python -m unet3d_dist.prepare`` as a real process on tiny scans written here (HDF5 and NIfTI): input that must be
refused in one sentence, with nothing written for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import SimpleITK as sitk
import yaml

from unet3d_dist.data.shards import ShardedDataset
from unet3d_dist.preparation.readers import image_xyz

SHAPE = (12, 10, 8)
RECIPE = {
    "name": "tiny-mri",
    "modality": "MRI",
    "labels": {"classes": {"background": [0], "organ": [1]}},
    "preprocessing": {"normalization": {"kind": "zscore"}},
    "splits": {"train": 1.0, "val": 0.0, "test": 0.0},
}


def prepare(tmp_path: Path, *arguments: object) -> subprocess.CompletedProcess:
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(RECIPE))
    command = [sys.executable, "-m", "unet3d_dist.prepare", "--config", config, *arguments, "--jobs", "1"]
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=120)


def scan_and_label() -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(SHAPE, np.uint8)
    label[3:8, 3:7, 2:6] = 1
    return np.random.default_rng(0).normal(100, 20, SHAPE).astype(np.float32) + 50 * label, label


def test_a_constant_image_or_a_symbolic_link_loop_is_skipped_in_one_sentence_by_every_reader(tmp_path):
    image, label = scan_and_label()
    h5_cases, folder_cases = tmp_path / "h5", tmp_path / "folders"
    h5_cases.mkdir()
    for name, voxels in (("good", image), ("flat", np.full(SHAPE, 7, np.int16))):
        with h5py.File(h5_cases / f"{name}.h5", "w") as h5:
            h5["image"], h5["label"] = voxels, label
    os.symlink("loop.h5", h5_cases / "loop.h5")
    for name, voxels in (("nii_good", image), ("nii_flat", np.full(SHAPE, -1024, np.int16)), ("nii_loop", None)):
        (folder_cases / name).mkdir(parents=True)
        sitk.WriteImage(image_xyz(label), str(folder_cases / name / "label.nii.gz"))
        if voxels is None:
            os.symlink("image.nii.gz", folder_cases / name / "image.nii.gz")
        else:
            sitk.WriteImage(image_xyz(voxels), str(folder_cases / name / "image.nii.gz"))

    out = tmp_path / "dataset"
    result = prepare(tmp_path, "--input", h5_cases, folder_cases, "--out", out)
    printed = result.stdout + result.stderr
    assert result.returncode == 3, printed
    assert "Traceback" not in printed
    blank = "in every voxel; expected a scan, not a blank volume"
    loop = "is a symbolic link loop (following its links leads back to it)"
    expected = {
        "flat": f"image {h5_cases / 'flat.h5'} has the same value (7) {blank}",
        "loop": f"{h5_cases / 'loop.h5'} {loop}",
        "nii_flat": f"image {folder_cases / 'nii_flat/image.nii.gz'} has the same value (-1024) {blank}",
        "nii_loop": f"{folder_cases / 'nii_loop/image.nii.gz'} {loop}",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert {item["id"]: item["reason"] for item in manifest["skipped"]} == expected
    for case_id, sentence in expected.items():
        assert f"skipped {case_id}: {sentence}" in printed
    assert sorted(ShardedDataset(out).records) == ["good", "nii_good"]
    with h5py.File(out / "shard-00000.h5", "r") as h5:
        assert sorted(h5) == ["good", "nii_good"]  # nothing of a refused case was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "folders", "h5", "recipe.yaml"]


def test_an_input_folder_or_out_that_is_a_symbolic_link_loop_stops_the_run_in_one_sentence(tmp_path):
    image, label = scan_and_label()
    (tmp_path / "cases").mkdir()
    with h5py.File(tmp_path / "cases/good.h5", "w") as h5:
        h5["image"], h5["label"] = image, label
    os.symlink("loop", tmp_path / "loop")
    for arguments, sentence in (
        (["--input", tmp_path / "loop", "--out", tmp_path / "out"], f"error: input {tmp_path / 'loop'} is a symbolic"),
        (
            ["--input", tmp_path / "cases", "--out", tmp_path / "loop"],
            f"error: --out {tmp_path / 'loop'} is a symbolic",
        ),
    ):
        result = prepare(tmp_path, *arguments)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
        assert result.stderr.startswith(sentence) and result.stderr.count("\n") == 1
        assert "link loop (following its links leads back to it)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases", "loop", "recipe.yaml"]
