"""The shipped recipes driven through the public commands: cross-validation, and the CT liver recipe on a real CT."""

import json
import subprocess
import sys

import pytest
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
def test_ct_liver_recipe_prepares_trains_and_scores_the_real_abdominal_ct(tmp_path):
    data = tmp_path / "ct"
    splits = tmp_path / "splits.yaml"
    splits.write_text(yaml.safe_dump({"train": ["ct_abdomen"]}))
    run(
        "unet3d_dist.prepare",
        "--config",
        str(REPO / "configs/prepare_totalseg_liver.yaml"),
        "--input",
        str(SHARED_DATA / "ct_abdomen"),
        "--out",
        str(data),
        "--splits",
        str(splits),
        "--jobs",
        "1",
    )
    manifest = json.loads((data / "manifest.json").read_text())
    (case,) = manifest["cases"]
    assert manifest["classes"] == ["background", "liver"] and case["spacing"] == [3.0, 3.0, 3.0]
    run(
        "unet3d_dist.train",
        "--config",
        str(REPO / "configs/ct_liver.yaml"),
        f"data.dataset={data}",
        f"log.runs_dir={tmp_path}",
        "data.crop=[32,32,32]",
        "model.widths=[4,8,8,16]",
        "data.samples_per_epoch=4",
        "train.epochs=2",
        "train.val_every=0",
        "inference.tta_flips=false",
        "log.wandb=disabled",
        "data.num_workers=0",
    )
    checkpoint = sorted((tmp_path / "ct_liver" / "checkpoints").glob("ckpt-*.pt"))[-1]
    run(
        "unet3d_dist.evaluate",
        "--checkpoint",
        str(checkpoint),
        "--split",
        "train",
        "--out",
        str(tmp_path / "eval"),
        "--wandb",
        "disabled",
    )
    (record,) = json.loads((tmp_path / "eval" / "results.json").read_text())["cases"]
    assert record["class"] == "liver" and record["ref_voxels"] == case["class_voxels"][1] > 1000
    assert 0.0 <= record["dice"] <= 1.0
    assert (tmp_path / "eval" / "panels" / "ct_abdomen.png").stat().st_size > 10_000
