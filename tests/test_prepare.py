"""``python -m unet3d_dist.prepare`` on the real scans in ../shared/data: every reader, the transforms, geometry,
bad input, resume after a crash, and refusing to overwrite."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from conftest import REPO, SHARED_DATA, recipe, small_cases

from unet3d_dist.data.shards import ShardedDataset, verify_dataset
from unet3d_dist.preparation.preprocess import ct_window, map_labels, resample, zscore
from unet3d_dist.preparation.readers import CaseError, array_xyz, image_xyz, read_image
from unet3d_dist.prepare import main

pytestmark = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the real scans are not at {SHARED_DATA} (set UNET3D_SHARED_DATA)"
)


def prepare(capsys, *args) -> tuple[int, str]:
    """Run the real command line in this process; return its exit status and everything it printed."""
    try:
        main([str(a) for a in args])
        code = 0  # a command returns when it succeeds
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def as_image(array: np.ndarray, record: dict) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(record["spacing"])
    image.SetOrigin(record["origin"])
    image.SetDirection(record["direction"])
    return image


def test_la_mri_hdf5_cases_become_zscored_shards(tmp_path, capsys):
    out = tmp_path / "la_mri"
    code, _ = prepare(
        capsys,
        "--config",
        REPO / "configs/prepare_la_mri.yaml",
        "--input",
        SHARED_DATA / "la_mri/train",
        "--out",
        out,
        "--jobs",
        1,
    )
    assert code == 0
    data = ShardedDataset(out)
    assert len(data.manifest["shards"]) == 2 and data.classes == ["background", "left_atrium"]
    assert {split: len(data.case_ids(split)) for split in data.splits()} == {
        "train": 14
    }  # cross-validated by the recipes
    sources = sorted((SHARED_DATA / "la_mri/train").glob("*.h5"))
    assert sorted(data.records) == [p.stem for p in sources]
    for path in sources:
        with h5py.File(path, "r") as h5:
            image, label = h5["image"][()], h5["label"][()]
        record, prepared = data.records[path.stem], data.image(path.stem)[0]
        assert record["shape"] == list(image.shape) and record["spacing"] == [0.625] * 3
        assert abs(float(prepared.mean())) < 1e-4 and abs(float(prepared.std()) - 1) < 1e-4
        np.testing.assert_allclose(prepared, zscore(image), atol=1e-5)
        np.testing.assert_array_equal(data.label(path.stem), label)
        assert record["class_voxels"] == [int((label == 0).sum()), int((label == 1).sum())]
        assert record["source"] == str(path.resolve())
    assert verify_dataset(out) == []
    assert data.manifest["preprocessing"]["normalization"] == {"kind": "zscore", "nonzero": False}


def test_abdominal_ct_liver_at_3mm_with_hu_window_and_geometry_round_trip(tmp_path, capsys):
    out = tmp_path / "liver"
    code, _ = prepare(
        capsys,
        "--config",
        REPO / "configs/prepare_totalseg_liver.yaml",
        "--input",
        SHARED_DATA / "ct_abdomen",
        "--out",
        out,
        "--jobs",
        1,
    )
    assert code == 0
    data = ShardedDataset(out)
    record = data.records["ct_abdomen"]
    source = sitk.ReadImage(str(SHARED_DATA / "ct_abdomen/image.nii.gz"))
    source_labels = sitk.ReadImage(str(SHARED_DATA / "ct_abdomen/labels.nii.gz"))
    assert record["class_voxels"][1] == 41_692 == int((array_xyz(source_labels) == 5).sum())
    assert record["spacing"] == [3.0] * 3 and record["direction"] == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert record["source_geometry"] == {
        "size": list(source.GetSize()),
        "spacing": list(source.GetSpacing()),
        "origin": list(source.GetOrigin()),
        "direction": list(source.GetDirection()),
    }

    # Back on the source grid, the prepared voxels are the windowed HU and the liver mask, voxel for voxel.
    back = sitk.Resample(
        as_image(data.image("ct_abdomen")[0], record), source, sitk.Transform(), sitk.sitkNearestNeighbor, -5.0
    )
    inside = array_xyz(back) != -5.0
    np.testing.assert_allclose(array_xyz(back)[inside], ct_window(array_xyz(source), -200, 250)[inside], atol=1e-6)
    assert inside.sum() == np.prod(record["shape"])  # every prepared voxel sits on a source voxel
    label_back = sitk.Resample(
        as_image(data.label("ct_abdomen"), record), source, sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    np.testing.assert_array_equal(array_xyz(label_back), (array_xyz(source_labels) == 5).astype(np.uint8))


def test_jpeg2000_dicom_series_is_paired_with_its_flipped_label_volume(tmp_path, capsys):
    out = tmp_path / "dicom"
    config = recipe(tmp_path, input__image="series", preprocessing__spacing=None)
    code, printed = prepare(capsys, "--config", config, "--input", SHARED_DATA / "ct_dicom", "--out", out, "--jobs", 1)
    assert code == 0 and "warning" not in printed
    data = ShardedDataset(out)
    record = data.records["ct_dicom"]
    labels = sitk.ReadImage(str(SHARED_DATA / "ct_dicom/labels.nii.gz"))
    assert labels.GetDirection()[4] == -1  # stored with y flipped against the series
    assert record["class_voxels"][1] == int((array_xyz(labels) == 5).sum()) == 366_708
    assert record["source_geometry"]["size"] == [512, 512, 20]
    assert record["spacing"] == pytest.approx([0.9765625, 0.9765625, 2.0])
    hu = data.image("ct_dicom")[0] * 225 + 25  # undo the [-200, 250] window
    liver = data.label("ct_dicom") == 1
    assert 60 < hu[liver].mean() < 130  # soft tissue: the mask lies on the liver, not on its mirror image


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "slices are unevenly spaced"),  # ITK would stack the rest as if nothing were missing
        ("truncated", "file(s) are not readable slices of its series"),  # ITK would drop it without a word
        ("stray", "file(s) are not readable slices of its series"),
    ],
)
def test_a_broken_dicom_series_is_refused_with_its_reason(tmp_path, damage, message):
    series = tmp_path / "series"
    shutil.copytree(SHARED_DATA / "ct_dicom/series", series)
    middle = sorted(series.iterdir())[10]
    if damage == "missing":
        middle.unlink()
    elif damage == "truncated":
        middle.write_bytes(middle.read_bytes()[:2000])
    else:
        (series / "notes.txt").write_text("not a slice")
    with pytest.raises(CaseError, match=re.escape(message)) as error:
        read_image(series)
    assert str(series) in str(error.value)


def test_lung_ct_nrrd_is_resampled_and_the_small_tumour_survives(tmp_path, capsys):
    out = tmp_path / "lung"
    config = recipe(
        tmp_path,
        input={"layout": "folders", "image": "image*", "label": "label*"},
        labels={"classes": {"background": [0], "tumour": [1]}, "unmapped": "error"},
        preprocessing__spacing=[1.0, 1.0, 2.0],
        preprocessing__crop={"to": "body", "threshold": -500, "margin_mm": 5},
    )
    code, _ = prepare(capsys, "--config", config, "--input", SHARED_DATA / "ct_lung", "--out", out, "--jobs", 1)
    assert code == 0
    data = ShardedDataset(out)
    record = data.records["ct_lung"]
    source = sitk.ReadImage(str(SHARED_DATA / "ct_lung/label.nrrd"))
    source_mask = sitk.GetArrayFromImage(source) > 0
    assert source_mask.sum() == 837 and record["spacing"] == [1.0, 1.0, 2.0]
    assert (
        record["shape"][0] == 292 and 200 < record["shape"][1] < 240 and record["shape"][2] == 120
    )  # air in front of the chest cut off
    volume_before = 837 * np.prod(source.GetSpacing())
    volume_after = record["class_voxels"][1] * 2.0
    assert abs(volume_after - volume_before) < 0.1 * volume_before

    def centroid(mask_xyz: np.ndarray, image: sitk.Image) -> np.ndarray:
        return np.array(image.TransformContinuousIndexToPhysicalPoint(np.argwhere(mask_xyz).mean(0).tolist()))

    prepared = as_image(data.label("ct_lung"), record)
    assert (
        np.linalg.norm(centroid(data.label("ct_lung") == 1, prepared) - centroid(array_xyz(source) > 0, source)) < 1.0
    )
    assert -1 <= data.image("ct_lung").min() and data.image("ct_lung").max() <= 1


def test_decathlon_layout_with_and_without_a_training_list_merges_tumour_into_liver(tmp_path, capsys):
    image = sitk.ReadImage(str(SHARED_DATA / "ct_abdomen/image.nii.gz"))
    organs = array_xyz(sitk.ReadImage(str(SHARED_DATA / "ct_abdomen/labels.nii.gz")))
    lits = np.select([organs == 5, organs == 1], [1, 2], 0).astype(np.uint8)  # liver 1; the spleen plays the tumour (2)
    msd, nnunet = tmp_path / "Task03_Liver", tmp_path / "nnunet"
    for root, image_name, label_name in (
        (msd, "liver_0.nii.gz", "liver_0.nii.gz"),
        (nnunet, "case_1_0000.nii.gz", "case_1.nii.gz"),
    ):
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        os.symlink(SHARED_DATA / "ct_abdomen/image.nii.gz", root / "imagesTr" / image_name)
        write_like(lits, image, root / "labelsTr" / label_name)
        (root / "labelsTr" / f"._{label_name}").write_bytes(b"macOS resource fork")  # shipped in the MSD archives
    (msd / "dataset.json").write_text(
        json.dumps({"training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}]})
    )
    (nnunet / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))

    out = tmp_path / "ct_liver"
    code, _ = prepare(
        capsys, "--config", REPO / "configs/prepare_ct_liver.yaml", "--input", msd, nnunet, "--out", out, "--jobs", 1
    )
    assert code == 0
    data = ShardedDataset(out)
    assert sorted(data.records) == ["case_1", "liver_0"] and data.classes == ["background", "liver"]
    for record in data.records.values():
        assert record["class_voxels"][1] == int(((organs == 5) | (organs == 1)).sum())


def write_like(array_xyz_: np.ndarray, like: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz_.transpose(2, 1, 0)))
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))


def test_bad_cases_get_their_own_error_and_the_rest_of_the_dataset_is_intact(tmp_path, capsys):
    image = sitk.ReadImage(str(SHARED_DATA / "ct_abdomen/image.nii.gz"))
    liver = (array_xyz(sitk.ReadImage(str(SHARED_DATA / "ct_abdomen/labels.nii.gz"))) == 5).astype(np.uint8)
    cases = tmp_path / "cases"
    for name in ("good", "truncated", "mismatch", "nan", "unmapped", "empty", "garbage"):
        (cases / name).mkdir(parents=True)
        shutil.copy(SHARED_DATA / "ct_abdomen/image.nii.gz", cases / name / "image.nii.gz")
        write_like(liver, image, cases / name / "labels.nii.gz")
    data = (cases / "truncated/image.nii.gz").read_bytes()
    (cases / "truncated/image.nii.gz").write_bytes(data[: len(data) // 2])
    sitk.WriteImage(
        sitk.ReadImage(str(cases / "mismatch/labels.nii.gz"))[:, :, :100], str(cases / "mismatch/labels.nii.gz")
    )
    with_nan = array_xyz(image).astype(np.float32)
    with_nan[60, 50, 40:45] = np.nan
    (cases / "nan/image.nii.gz").unlink()
    write_like(with_nan, image, cases / "nan/image.nrrd")  # ITK reads NaN in NIfTI files as 0
    stray = liver.copy()
    stray[0, 0, 0] = 7
    write_like(stray, image, cases / "unmapped/labels.nii.gz")
    write_like(np.zeros_like(liver), image, cases / "empty/labels.nii.gz")
    (cases / "garbage/image.nii.gz").write_bytes(b"not an image at all")

    out = tmp_path / "dataset"
    config = recipe(
        tmp_path,
        labels={"classes": {"background": [0], "liver": [1]}, "unmapped": "error"},
        preprocessing__spacing=[6, 6, 6],
        preprocessing__crop={"to": "none"},
        shards={"cases_per_shard": 3},
    )
    code, printed = prepare(capsys, "--config", config, "--input", cases, "--out", out, "--jobs", 2)
    assert code == 3
    expected = {
        "truncated": "truncated or not valid gzip",
        "mismatch": "is not on the grid of image",
        "nan": "holds 5 NaN or infinite voxels",
        "unmapped": "holds values 7 that labels.classes does not map",
        "garbage": "cannot read",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {item["id"]: item["reason"] for item in manifest["skipped"]}
    assert reasons.keys() == expected.keys()
    for case_id, phrase in expected.items():
        assert phrase in reasons[case_id] and str(cases / case_id) in reasons[case_id], reasons[case_id]
        assert f"skipped {case_id}:" in printed
    assert "2 cases prepared (2 train), 5 skipped" in printed
    assert "warning empty:" in printed and "no voxel of liver" in manifest["warnings"]["empty"][0]
    data = ShardedDataset(out)
    assert sorted(data.records) == ["empty", "good"] and verify_dataset(out) == []
    assert data.records["good"]["class_voxels"][1] > 4000 and data.records["empty"]["class_voxels"][1] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases", "dataset", "recipe-0.yaml"]  # no partial folder left


def test_rerun_after_a_crash_skips_finished_shards_and_nothing_is_overwritten_by_accident(tmp_path, capsys):
    cases, out = small_cases(tmp_path, 6), tmp_path / "dataset"
    config = recipe(tmp_path, preprocessing__spacing=[6, 6, 6], shards={"cases_per_shard": 1})
    command = [
        sys.executable,
        "-m",
        "unet3d_dist.prepare",
        "--config",
        str(config),
        "--input",
        str(cases),
        "--out",
        str(out),
        "--jobs",
        "1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    first = tmp_path / "dataset.partial" / "shard-00000.h5"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert process.poll() is None and time.monotonic() < deadline, "prepare ended (or hung) before its first shard"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    finished = first.stat()

    code, printed = prepare(capsys, "--config", config, "--input", cases, "--out", out, "--jobs", 1)
    assert code == 0 and "shards are already done" in printed
    shard = out / "shard-00000.h5"
    assert (shard.stat().st_ino, shard.stat().st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)
    assert len(ShardedDataset(out).records) == 6 and verify_dataset(out) == []

    manifest_before = (out / "manifest.json").read_bytes()
    code, printed = prepare(capsys, "--config", config, "--input", cases, "--out", out)
    assert code == 2 and "already holds a prepared dataset; pass --overwrite" in printed
    assert (out / "manifest.json").read_bytes() == manifest_before

    splits = tmp_path / "splits.yaml"
    splits.write_text(yaml.safe_dump({"train": [f"case{i}" for i in range(4)], "val": ["case4"], "test": ["case5"]}))
    code, printed = prepare(
        capsys, "--config", config, "--input", cases, "--out", out, "--splits", splits, "--overwrite", "--jobs", 1
    )
    assert code == 0
    assert {r["id"]: r["split"] for r in ShardedDataset(out).manifest["cases"]}["case4"] == "val"

    with open(shard, "r+b") as fh:
        fh.seek(shard.stat().st_size // 2)
        fh.write(b"\x00\x01\x02\x03")
    code, printed = prepare(capsys, "--verify", out)
    assert code == 1 and "shard-00000.h5: sha256 differs from the manifest" in printed


def test_a_case_smaller_than_a_training_crop_is_kept_without_a_warning_and_training_names_it(tmp_path, capsys):
    from unet3d_dist.data.crops import padding_note

    out = tmp_path / "dataset"
    config = recipe(tmp_path, preprocessing__spacing=[12, 12, 12], preprocessing__crop={"to": "none"})
    code, printed = prepare(capsys, "--config", config, "--input", small_cases(tmp_path, 1), "--out", out, "--jobs", 1)
    assert code == 0 and "warning" not in printed  # prepare cannot know the crop a run will use
    assert json.loads((out / "manifest.json").read_text())["warnings"] == {}
    shapes = {case: ShardedDataset(out).records[case]["shape"] for case in ("case0",)}
    assert shapes["case0"] == [30, 25, 28]
    assert padding_note(shapes | {"big": [70, 70, 50]}, (64, 64, 48)) == (
        "1 of 2 train cases are smaller than the crop 64x64x48 along x, y, z (case0: 30x25x28); their crops are "
        "padded there"
    )
    assert padding_note(shapes, (16, 16, 16)) is None


def test_recipe_mistakes_stop_with_one_sentence(tmp_path, capsys):
    cases = small_cases(tmp_path, 1)
    code, printed = prepare(
        capsys, "--config", recipe(tmp_path, preprocessing__spacng=[1, 1, 1]), "--input", cases, "--out", tmp_path / "x"
    )
    assert code == 2 and printed.startswith(
        "error: unknown recipe key 'preprocessing.spacng' (did you mean 'spacing'?); keys in 'preprocessing' are: "
        "normalization, spacing"
    )
    code, printed = prepare(
        capsys,
        "--config",
        recipe(tmp_path, preprocessing__orientation="LRS"),
        "--input",
        cases,
        "--out",
        tmp_path / "x",
    )
    assert code == 2 and "preprocessing.orientation must be three letters" in printed
    splits = tmp_path / "splits.yaml"
    splits.write_text(yaml.safe_dump({"train": ["case0", "case9"]}))
    code, printed = prepare(
        capsys, "--config", recipe(tmp_path), "--input", cases, "--out", tmp_path / "x", "--splits", splits
    )
    assert code == 2 and "does not match the input: no such case case9" in printed
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_label_mapping_merges_and_refuses_strays():
    label = np.array([[[0, 1, 2, 7]]], np.int16)
    np.testing.assert_array_equal(map_labels(label, {"bg": [0], "liver": [1, 2]}, "background", "x"), [[[0, 1, 1, 0]]])
    with pytest.raises(CaseError, match="label x holds values 7 that labels.classes does not map"):
        map_labels(label, {"bg": [0], "liver": [1, 2]}, "error", "x")


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_resampling_keeps_origin_direction_and_extent(interpolation):
    ramp = np.add.outer(np.add.outer(np.arange(20.0), np.arange(16.0)), np.arange(10.0)).astype(np.float32)
    image = image_xyz(ramp, spacing=(1.0, 1.0, 3.0))
    image.SetOrigin((5.0, -2.0, 7.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    out = resample(image, [2.0, 2.0, 1.5], interpolation, 0.0)
    assert out.GetSize() == (10, 8, 20) and out.GetSpacing() == (2.0, 2.0, 1.5)
    assert out.GetOrigin() == image.GetOrigin() and out.GetDirection() == image.GetDirection()
    inner = array_xyz(out)[2:-2, 2:-2, 6:-6]  # away from the edges, where a B-spline feels the boundary
    expected = np.add.outer(np.add.outer(np.arange(2, 8) * 2.0, np.arange(2, 6) * 2.0), np.arange(6, 14) * 0.5)
    np.testing.assert_allclose(inner, expected, atol=0.02)  # a linear ramp survives both interpolators
