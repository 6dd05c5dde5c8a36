"""The shipped recipes driven through the public commands: cross-validation, and the CT liver recipe on a real CT."""

import json
import subprocess
import sys

import pytest
import SimpleITK as sitk
import yaml
from conftest import REPO, SHARED_DATA, TINY


def run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args[0]} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_crossval_trains_every_fold_and_scores_each_case_once(tmp_path, tiny_dataset):
    recipe = tmp_path / "cv.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"data": {"dataset": str(tiny_dataset)}, "log": {"run_name": "tinycv", "runs_dir": str(tmp_path)}}
        )
    )
    overrides = [o for o in TINY if not o.startswith("train.val_every")] + ["train.epochs=1", "train.val_every=0"]
    printed = run("unet3d_dist.crossval", "--config", str(recipe), "--folds", "2", *overrides).stdout
    folds = [json.loads((tmp_path / "tinycv-cv" / f"fold{k}" / "results.json").read_text()) for k in range(2)]
    held_out = [r["case"] for fold in folds for r in fold["cases"]]
    assert sorted(held_out) == [
        "a",
        "b",
        "c",
        "d",
    ]  # the train split, each case scored once, by the run that never saw it
    summary = (tmp_path / "tinycv-cv" / "summary.md").read_text()
    assert "| pooled (4) | box |" in summary and "| fold 0 (2) | box |" in summary and "hd95_vox" in summary
    assert "pooled" in printed
    # The printed ensemble command scores the two fold models together on the test case, which neither saw.
    evaluate = next(line for line in printed.splitlines() if "score it on cases no fold trained on" in line)
    command = evaluate.split(": ", 1)[1].split()
    assert command[:3] == ["python", "-m", "unet3d_dist.evaluate"] and command.count("--checkpoint") == 2
    run(*command[2:], "--wandb", "disabled")
    ensemble = json.loads((tmp_path / "tinycv-cv" / "ensemble-test" / "results.json").read_text())
    assert [r["case"] for r in ensemble["cases"]] == ["f"] and len(ensemble["checkpoints"]) == 2
    # Running it again skips the finished folds and only rewrites the summary.
    again = run("unet3d_dist.crossval", "--config", str(recipe), "--folds", "2", *overrides).stdout
    assert "unet3d_dist.train" not in again


@pytest.mark.skipif(
    not (SHARED_DATA / "ct_abdomen").is_dir(), reason=f"real scans not found in {SHARED_DATA} (set UNET3D_SHARED_DATA)"
)
def test_13_organs_of_the_real_abdominal_ct_are_planned_trained_scored_and_predicted_class_by_class(tmp_path):
    """plan with prepare_totalseg_organs.yaml as the base recipe, its train.yaml with a loader worker, evaluate,
    predict."""
    plan, classes = tmp_path / "organs", json.loads((SHARED_DATA / "ct_abdomen/classes.json").read_text())
    recipe = yaml.safe_load((REPO / "configs/prepare_totalseg_organs.yaml").read_text())["labels"]["classes"]
    printed = run(
        "unet3d_dist.plan",
        *("--input", str(SHARED_DATA / "ct_abdomen"), "--recipe", str(REPO / "configs/prepare_totalseg_organs.yaml")),
        *("--out", str(plan), "--minutes", "0.5", "--spacing", "3", "3", "3"),
    ).stdout
    assert "adrenal_gland_left" in printed and "preprocessing.spacing" in printed
    data = plan / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    (case,) = manifest["cases"]
    organs = manifest["classes"][1:]
    assert len(organs) == 13 and all(classes[str(recipe[name][0])] == name for name in organs)
    assert case["spacing"] == [3.0, 3.0, 3.0] and case["class_voxels"][organs.index("liver") + 1] > 1000
    printed = run(
        "unet3d_dist.train",
        *("--config", str(plan / "train.yaml"), f"log.runs_dir={tmp_path / 'runs'}", "train.val_every=0"),
        *("log.wandb=disabled", "model.widths=[4,8,8,16]", "data.samples_per_epoch=24", "train.epochs=2"),
        *("data.foreground_fraction=1.0", "inference.tta_flips=false", "data.num_workers=1", "data.crop=[32,32,32]"),
    ).stdout
    # Every crop is centred on a class the scan holds, drawn uniformly: each organ but the absent oesophagus is in
    # some crops, and the console line (smallest share first) agrees with the logged shares.
    line = next(line for line in printed.splitlines() if line.startswith("epoch 1: crops holding each class: "))
    shown = dict(item.rsplit(" ", 1) for item in line.split(": ", 2)[2].split(", "))
    logged = next(
        json.loads(row)
        for row in (tmp_path / "runs" / "organs" / "metrics.jsonl").read_text().splitlines()
        if "train/crops_with/liver" in row
    )
    assert set(shown) == set(organs) and shown["esophagus"] == "0%" and list(shown)[0] == "esophagus"
    assert all(logged[f"train/crops_with/{name}"] > 0 for name in organs if name != "esophagus")
    assert [f"{logged[f'train/crops_with/{name}']:.0%}" for name in shown] == list(shown.values())

    checkpoint = sorted((tmp_path / "runs" / "organs" / "checkpoints").glob("ckpt-*.pt"))[-1]
    evaluated = run(
        "unet3d_dist.evaluate",
        *("--checkpoint", str(checkpoint), "--split", "train", "--out", str(tmp_path / "eval"), "--wandb", "disabled"),
    ).stdout
    records = json.loads((tmp_path / "eval" / "results.json").read_text())["cases"]
    assert [r["class"] for r in records] == organs
    assert [r["ref_voxels"] for r in records] == case["class_voxels"][1:]
    assert all(0.0 <= r["dice"] <= 1.0 for r in records)
    # The console table has one row per organ and the mean over the 12 organs the scan holds, not a row per
    # (organ, metric).
    assert sum(f"│ {name} " in evaluated for name in organs) == 13
    assert "mean of 12 classes (no case holds esophagus)" in evaluated
    assert (tmp_path / "eval" / "panels" / "ct_abdomen.png").stat().st_size > 10_000

    predicted = run(
        "unet3d_dist.predict",
        *("--checkpoint", str(checkpoint), str(SHARED_DATA / "ct_abdomen/image.nii.gz"), "--out", str(tmp_path / "p")),
    ).stdout
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p" / "image_mask.nii.gz")))
    assert mask.shape == (112, 101, 122) and mask.max() <= 13 and "image_panel.png" in predicted
