"""``python -m unet3d_dist.plan``: the planning rules on hand-made fingerprints, and plan -> train -> evaluate ->
predict through the public commands on a two-channel Decathlon task built from the real abdominal CT."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from conftest import REPO, SHARED_DATA, TINY
from rich.console import Console
from test_channels import four_d

from unet3d_dist.config import ConfigError, load_config
from unet3d_dist.data.synthetic import SPACING_MM, make_phantom
from unet3d_dist.planning import budget, cluster, rules
from unet3d_dist.planning import fingerprint as fingerprint_module
from unet3d_dist.planning.sources import base_recipe, decathlon_recipe, fingerprint_of
from unet3d_dist.preparation.recipe import recipe_from_dict

RESULTS = REPO / "docs" / "RESULTS.md"


def fingerprint(median, p10=None, extent=(300.0, 300.0, 300.0), classes=None, channels=None) -> dict:
    return {
        "spacing": {"median": list(median), "p10": list(p10 or median)},
        "extent_mm_median": list(extent),
        "classes": classes or {"organ": {"median_volume_ml": 500.0, "share_of_cases": 1.0}},
        "channels": channels or {},
    }


def test_the_spacing_is_the_median_the_coarse_axis_its_10th_percentile_and_coarser_when_the_crop_sees_too_little():
    assert rules.target_spacing(fingerprint((0.8, 0.8, 0.8)), 1e9).value == [0.8, 0.8, 0.8]
    anisotropic = rules.target_spacing(fingerprint((0.7, 0.7, 5.0), p10=(0.6, 0.6, 3.0)), 1e9)
    assert anisotropic.value == [0.7, 0.7, 3.0] and "10th percentile" in anisotropic.reason
    # 300 mm cubed at 1 mm is 27 M voxels: at 1.5 mm it is 8 M, of which a 4 M-voxel crop covers half.
    coarse = rules.target_spacing(fingerprint((1.0, 1.0, 1.0)), 27e6 / 2 / 1.5**3)
    assert coarse.value == pytest.approx([1.5] * 3, abs=1e-3) and "coarsened 1.50x" in coarse.reason


def test_the_crop_starts_at_the_median_scan_and_shrinks_its_longest_side_in_mm_by_8_voxels():
    assert rules.crop_shape([50, 41, 30], [1, 1, 1], 1e9).value == [56, 48, 32]
    # 160 x 160 x 120 mm: x and y shrink first, then whichever is longest in mm, so the crop stays near a cube in mm
    shrunk = rules.crop_shape([160, 160, 40], [1.0, 1.0, 3.0], 96 * 96 * 40).value
    assert shrunk == [104, 104, 32] and math.prod(shrunk) <= 96 * 96 * 40
    assert rules.crop_shape([400, 400, 400], [1, 1, 1], 10).value == [16, 16, 16]  # never below the network's need
    # the left atrium at 1.133 mm: of the tied 48-voxel sides, z (49 deep) shrinks, not x (110 long)
    assert rules.crop_shape([110, 78, 49], [1.133] * 3, 104e3).value == [48, 48, 40]


def test_the_network_halves_every_side_while_the_bottleneck_keeps_4_voxels():
    depth = rules.network_depth
    assert depth([56, 56, 56], [0.9] * 3).value == [16, 32, 64, 128]  # 7 per side; 56 / 16 is no whole voxel
    five = depth([112, 112, 80], [3.0] * 3)
    assert five.value == [16, 32, 64, 128, 256] and "7x7x5 cells of 48x48x48 mm" in five.reason
    assert depth([64, 64, 24], [1.0, 1.0, 3.0]).value == [16, 32, 64]  # 24 / 8 = 3 < 4: the thin side decides
    deepest = depth([256, 256, 256], [1.0] * 3)
    assert deepest.value == [16, 32, 64, 128, 256, 320] and "limit" in deepest.reason
    for crop in ([16, 16, 16], [56, 48, 32], [112, 112, 80], [256, 256, 256]):  # the config accepts each plan
        load_config(None, [f"data.crop={crop}", f"model.widths={depth(crop, [1.0] * 3).value}"])


def test_ct_is_windowed_to_its_foreground_and_mri_z_scored_inside_a_masked_background():
    stats = {"foreground_percentiles": {"0.5": -87.04, "50.0": 60.0, "99.5": 212.96}, "zero_share": 0.0}
    ct = rules.normalization(fingerprint((1, 1, 1), channels={"image": stats}), "CT")
    assert ct.value == {"kind": "ct_window", "window": [-87.0, 213.0]}
    mri = {"t1": {**stats, "zero_share": 0.6}, "t2": stats}
    assert rules.normalization(fingerprint((1, 1, 1), channels=mri), "MRI").value == {
        "t1": {"kind": "zscore", "nonzero": True},
        "t2": {"kind": "zscore", "nonzero": False},
    }


def test_the_labels_say_whether_to_keep_each_classs_largest_predicted_piece():
    label = np.zeros((12, 12, 12), np.uint8)
    label[1:4, 1:4, 1:4] = 1  # one piece of 27 voxels
    label[6:9, 6:9, 6:9] = 2
    label[10:11, 0:9, 0] = 2  # and a second, unconnected piece of 9: the largest holds 27 of 36
    assert fingerprint_module.largest_piece_shares(label, num_classes=4) == [1.0, 0.75, None]

    def planned(**shares):
        classes = {name: {"share_of_cases": 1.0, "largest_piece_share_p10": s} for name, s in shares.items()}
        return rules.largest_component(fingerprint((1, 1, 1), classes=classes))

    assert planned(liver=0.99, spleen=0.93).value is True
    split = planned(liver=0.99, lesion=0.4)
    assert split.value is False and "lesion" in split.reason


def test_a_ct_fingerprint_is_taken_inside_the_body_crop_that_prepare_will_make(tmp_path):
    hu = np.full((40, 40, 40), -1000, np.int16)  # (z, y, x), as SimpleITK holds it
    hu[10:26, 12:22, 5:25] = 40  # the body: 20 x 10 x 16 voxels (x, y, z) of 2 mm
    shapes = {}
    for modality in ("CT", "MRI"):
        task = tmp_path / modality
        for folder, array in (("imagesTr", hu), ("labelsTr", (hu > 0).astype(np.uint8))):
            (task / folder).mkdir(parents=True)
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((2.0, 2.0, 2.0))
            sitk.WriteImage(image, str(task / folder / "box_0.nii.gz"))
        described = {"name": "Box", "modality": {"0": modality}, "labels": {"0": "background", "1": "box"}}
        (task / "dataset.json").write_text(json.dumps(described))
        found = fingerprint_of([task], base_recipe([task], None, None), Console(quiet=True))
        shapes[modality] = found["shape"]["median"]
    assert shapes == {"CT": [30, 20, 26], "MRI": [40, 40, 40]}  # 10 mm of margin: 5 voxels on each side


def test_the_fingerprint_leaves_out_a_case_that_prepare_refuses(tmp_path):
    rng = np.random.default_rng(0)
    for name, image in (("good", rng.normal(size=(20, 20, 20))), ("blank", np.zeros((20, 20, 20)))):
        with h5py.File(tmp_path / f"{name}.h5", "w") as h5:
            h5["image"], h5["label"] = image.astype(np.float32), (image > 1).astype(np.uint8)
    recipe = recipe_from_dict({"name": "h5", "modality": "MRI", "labels": {"classes": {"background": [0], "a": [1]}}})
    found = fingerprint_of([tmp_path], recipe, Console(quiet=True))
    assert list(found["per_case"]) == ["good"]  # an image of one value: prepare skips it, so the plan leaves it out


def test_both_dataset_json_styles_give_the_same_base_recipe():
    decathlon = {"name": "Heart", "labels": {"1": "left atrium", "0": "background"}, "modality": {"0": "MRI"}}
    nnunet = {"name": "Heart", "labels": {"background": 0, "left atrium": 1}, "channel_names": {"0": "MRI"}}
    assert decathlon_recipe(decathlon) == decathlon_recipe(nnunet)
    assert decathlon_recipe(decathlon)["labels"]["classes"] == {"background": [0], "left atrium": [1]}
    assert decathlon_recipe({"labels": {}, "modality": {"0": "T1", "1": "FLAIR"}})["input"]["channels"] == [
        "t1",
        "flair",
    ]


def test_the_all_reduce_model_gives_the_figures_of_docs_performance():
    parameters = 1_788_706
    assert cluster.allreduce_seconds(parameters, 4) * 1e3 == pytest.approx(0.10, abs=0.01)
    assert cluster.allreduce_seconds(parameters, 16) * 1e3 == pytest.approx(1.20, abs=0.01)
    assert cluster.allreduce_seconds(parameters, 64) * 1e3 == pytest.approx(1.30, abs=0.01)


def test_the_cluster_table_spreads_the_planned_crops_over_the_gpus():
    """data.samples_per_epoch counts crops over all ranks: more GPUs take fewer steps of a larger global batch."""
    rows = cluster.cluster_rows(1_788_706, step_s=0.1, batch=2, crops=43_000)
    gpus, global_batch, steps = ([int(row[i].replace(",", "")) for row in rows] for i in (0, 3, 4))
    assert gpus == [1, 4, 8, 16, 64]
    assert steps == [math.ceil(43_000 / b) for b in global_batch]
    assert rows[0][-1] == "36 min" and rows[1][-1] == "9 min"  # 21,500 and 5,375 steps of 0.1 s


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"{args[0]} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    print(args[0], f"{time.perf_counter() - start:.1f} s")
    return result


@pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the real scans are not at {SHARED_DATA} (set UNET3D_SHARED_DATA)"
)
def test_a_two_channel_decathlon_task_is_planned_prepared_trained_evaluated_and_predicted(tmp_path):
    """Two cases of the real CT with a derived second channel (the same HU, the Decathlon's 4-D NIfTI)."""
    task = tmp_path / "Task99_Liver"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    stacked = four_d(tmp_path / "both.nii.gz")
    liver = sitk.ReadImage(str(SHARED_DATA / "ct_abdomen/labels.nii.gz")) == 5
    for case in ("liver_0", "liver_1"):
        os.symlink(stacked, task / "imagesTr" / f"{case}.nii.gz")
        sitk.WriteImage(sitk.Cast(liver, sitk.sitkUInt8), str(task / "labelsTr" / f"{case}.nii.gz"))
    described = {"name": "Liver2", "modality": {"0": "CT", "1": "CT-copy"}, "labels": {"0": "background", "1": "liver"}}
    (task / "dataset.json").write_text(json.dumps(described))

    out = tmp_path / "plan"
    printed = run("unet3d_dist.plan", "--input", str(task), "--out", str(out), "--minutes", "0.5").stdout
    for line in ("fingerprint: 2 cases", "preprocessing.spacing", "data.crop", "schedule", "efficiency"):
        assert line in printed, printed
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["preprocessing"]["channels"] == ["ct", "ct-copy"] and manifest["fingerprint"]["cases"] == 2
    recipe = yaml.safe_load((out / "prepare.yaml").read_text())
    windows = [spec["window"] for spec in recipe["preprocessing"]["normalization"].values()]
    # The two channels hold the same HU, so each is windowed to the same foreground percentiles: the liver's.
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED_DATA / "ct_abdomen/image.nii.gz")))[
        sitk.GetArrayFromImage(liver) > 0
    ]
    assert windows[0] == windows[1] == pytest.approx(np.percentile(hu, [0.5, 99.5]), abs=2.0)

    planned = yaml.safe_load((out / "train.yaml").read_text())
    widths = planned["model"]["widths"]
    assert planned["inference"]["largest_component"] is True  # the liver is one piece in its label
    assert planned["data"]["foreground_fraction"] == 0.5  # the plan's share, not the config default of 1/3
    assert widths == rules.network_depth(planned["data"]["crop"], manifest["preprocessing"]["spacing"]).value
    # The planned crop and network train as planned; only the schedule is cut short.
    tiny = [o for o in TINY if not o.startswith(("data.crop", "model.widths"))]
    tiny += ["train.epochs=1", "data.samples_per_epoch=4"]
    run(
        "unet3d_dist.train",
        "--config",
        str(out / "train.yaml"),
        f"log.runs_dir={tmp_path / 'runs'}",
        *tiny,
        "data.num_workers=1",
    )
    checkpoint = sorted((tmp_path / "runs" / "plan" / "checkpoints").glob("ckpt-*.pt"))[-1]
    weights = torch.load(checkpoint, weights_only=True)["model"]
    assert [weights[f"encoders.{i}.conv1.weight"].shape[0] for i in range(len(widths))] == widths
    assert f"encoders.{len(widths)}.conv1.weight" not in weights
    run("unet3d_dist.evaluate", "--checkpoint", str(checkpoint), "--split", "train", "--out", str(tmp_path / "eval"))
    records = json.loads((tmp_path / "eval" / "results.json").read_text())["cases"]
    assert [r["case"] for r in records] == ["liver_0", "liver_1"] and all(0 <= r["dice"] <= 1 for r in records)
    run("unet3d_dist.predict", "--checkpoint", str(checkpoint), str(stacked), "--out", str(tmp_path / "predicted"))
    mask = sitk.ReadImage(str(tmp_path / "predicted" / "both_mask.nii.gz"))
    assert mask.GetSize() == liver.GetSize()


def test_the_budget_trains_one_model_until_each_fold_gets_the_measured_schedule_then_grows_the_crop():
    reference = math.prod(budget.REFERENCE_CROP)
    small, medium = budget.spend(1_000, 14, "auto"), budget.spend(12_000, 14, "auto")
    large, huge = budget.spend(20_000, 14, "auto"), budget.spend(60_000, 14, "auto")
    assert (small.runs, small.run_steps, small.crop_voxels) == (1, 1_000, reference / 2)  # the crop shrinks first
    assert (medium.runs, medium.run_steps, medium.crop_voxels) == (1, 12_000, reference)  # then steps grow
    assert (large.runs, large.run_steps, large.crop_voxels) == (5, 4_000, reference)  # then the fold ensemble
    assert (huge.runs, huge.run_steps, huge.crop_voxels) == (5, 12_000, 3 * reference)  # then the crop
    assert budget.spend(60_000, 14, "all").runs == 1 and budget.spend(1_000, 14, "folds").runs == 5
    with pytest.raises(ConfigError, match="--final folds needs at least 5 cases for 5 folds; the input has 3"):
        budget.spend(1_000, 3, "folds")


def phantom_task(root: Path, cases: int) -> Path:
    """The built-in CT phantom as a Decathlon task of NIfTI files, as a user's own scans would come."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(cases):
        hu, label = make_phantom(np.random.default_rng([7, i]), (64, 56, 48))
        for folder, volume in (("imagesTr", hu), ("labelsTr", label)):
            image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))  # (x, y, z) -> SimpleITK's (z, y, x)
            image.SetSpacing((SPACING_MM,) * 3)
            sitk.WriteImage(image, str(root / folder / f"phantom_{i:03d}.nii.gz"))
    described = {"name": "Phantom", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"}}
    (root / "dataset.json").write_text(json.dumps(described))
    return root


def test_the_phantom_planned_at_two_budgets_gets_two_schedules_and_final_models(tmp_path):
    """--step-seconds stands for the machine that will train, so the budget in steps does not depend on this one."""
    task = phantom_task(tmp_path / "Task98_Phantom", 5)
    planned = {}
    for minutes in (5, 150):
        out = tmp_path / f"plan{minutes}"
        args = ["--input", str(task), "--out", str(out), "--no-prepare", "--step-seconds", "0.3"]
        printed = run("unet3d_dist.plan", *args, "--minutes", str(minutes)).stdout
        planned[minutes] = (yaml.safe_load((out / "train.yaml").read_text()), printed)
        assert "final model" in printed and "next: python -m unet3d_dist." in printed, printed
    (short, short_printed), (long, long_printed) = planned[5], planned[150]
    assert "next: python -m unet3d_dist.train" in short_printed and "one model on every case" in short_printed
    assert "next: python -m unet3d_dist.crossval" in long_printed and "5-fold ensemble" in long_printed
    steps = [p["train"]["epochs"] * p["data"]["samples_per_epoch"] // p["train"]["batch_size"] for p in (short, long)]
    # 5 min buy 900 reference steps: a smaller crop for 2,000 or more. 150 min buy 27,000: 5 folds of larger crops.
    assert 2_000 <= steps[0] < 3_000 and steps[1] >= 4_000, steps  # crops round down (or stop at the scan): cheaper
    assert math.prod(short["data"]["crop"]) < math.prod(budget.REFERENCE_CROP) < math.prod(long["data"]["crop"])
    cited = set(re.findall(r'"([^"]+)"', "".join((tmp_path / f"plan{m}" / "plan.md").read_text() for m in planned)))
    headings = [line.lstrip("# ") for line in RESULTS.read_text().splitlines() if line.startswith("#")]
    assert cited and all(any(h.startswith(title) for h in headings) for title in cited), cited  # each one exists


@pytest.mark.skipif(
    not (SHARED_DATA / "la_mri").is_dir(), reason=f"the real scans are not at {SHARED_DATA} (set UNET3D_SHARED_DATA)"
)
def test_the_left_atrium_planned_at_the_recipes_budget_is_the_shipped_cpu_recipe(tmp_path):
    """20,000 reference steps (100 min at 0.27 s, a 2-core Zen 5 in bf16) plan the recipe that was measured."""
    args = ["--input", str(SHARED_DATA / "la_mri" / "train"), "--recipe", "configs/prepare_la_mri.yaml"]
    out = tmp_path / "la"
    printed = run(
        "unet3d_dist.plan", *args, "--out", str(out), "--no-prepare", "--minutes", "100", "--step-seconds", "0.27"
    ).stdout
    planned = yaml.safe_load((out / "train.yaml").read_text())
    spacing = yaml.safe_load((out / "prepare.yaml").read_text())["preprocessing"]["spacing"]
    shipped = load_config("configs/la_mri_cpu.yaml", [])
    shipped_recipe = yaml.safe_load(Path("configs/prepare_la_mri_1.25mm.yaml").read_text())
    shipped_spacing = recipe_from_dict(shipped_recipe).preprocessing.spacing
    steps = planned["train"]["epochs"] * planned["data"]["samples_per_epoch"] // planned["train"]["batch_size"]
    shipped_steps = shipped.train.epochs * shipped.data.samples_per_epoch // shipped.train.batch_size
    assert "next: python -m unet3d_dist.crossval" in printed and "--folds 5" in printed  # the fold ensemble
    assert spacing == pytest.approx(shipped_spacing, rel=0.03)
    assert math.prod(planned["data"]["crop"]) == pytest.approx(math.prod(shipped.data.crop), rel=0.1)
    assert steps == pytest.approx(shipped_steps, rel=0.1)
    assert planned["data"]["foreground_fraction"] == shipped.data.foreground_fraction
    assert planned["model"]["deep_supervision"] == shipped.model.deep_supervision
    assert planned["inference"]["largest_component"] is True


@pytest.mark.parametrize("flag", ["--minutes", "--memory-gb", "--step-seconds"])
def test_a_zero_budget_flag_is_refused_in_one_sentence(flag):
    command = [sys.executable, "-m", "unet3d_dist.plan", "--input", "x", "--out", "y", flag, "0"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "--step-seconds and --spacing must be positive" in result.stderr, result.stderr
