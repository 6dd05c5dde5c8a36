"""The evaluation command end to end: real checkpoint, real HDF5, real torchrun (gloo), outputs checked with medpy."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY, box_case, torchrun, train
from medpy.metric import binary as medpy

from unet3d_dist.checkpoint import dataset_entry, inference_checkpoint, read_checkpoint
from unet3d_dist.config import load_config
from unet3d_dist.data.shards import ShardedDataset, write_dataset
from unet3d_dist.evaluate import main
from unet3d_dist.evaluation import UNFINISHED
from unet3d_dist.inference import resample_to_shape, sliding_window_logits
from unet3d_dist.masks import load_mask
from unet3d_dist.model import build_model
from unet3d_dist.precision import resolve_amp
from unet3d_dist.segmenter import Segmenter, read_checkpoints

CASES = ["big", "border", "empty", "small", "wide"]
CLASSES = ["background", "box"]


@pytest.fixture(scope="module")
def five_cases(tmp_path_factory) -> Path:
    """Five test volumes (one smaller than the 16x16x8 patch, one without foreground, one touching the border)."""
    root = tmp_path_factory.mktemp("five") / "dataset"
    cases = [
        box_case("big", (48, 40, 28), np.s_[10:30, 8:28, 5:20], "test", 11),
        box_case("border", (36, 32, 20), np.s_[0:12, 20:32, 4:12], "test", 12),
        box_case("empty", (24, 24, 16), None, "test", 13),
        box_case("small", (12, 10, 6), np.s_[3:8, 2:7, 1:4], "test", 14),
        box_case("wide", (40, 20, 16), np.s_[5:35, 5:15, 4:12], "test", 15),
        box_case("train-only", (24, 24, 16), np.s_[5:15, 5:15, 4:12], "train", 16),
    ]
    write_dataset(root, cases, CLASSES, name="five", modality="CT", preprocessing={}, cases_per_shard=2)
    return root


def write_checkpoint(path: Path, dataset: Path, seed: int, *overrides: str, **entry: object) -> Path:
    """An inference checkpoint as the Trainer writes it, of a fresh tiny model (the tests check plumbing, not skill);
    ``entry`` replaces items of its dataset entry (classes, preprocessing)."""
    cfg = load_config(None, [f"data.dataset={dataset}", *TINY, "inference.largest_component=false", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model, 1, len(CLASSES))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(inference_checkpoint(model, cfg, dataset_entry(ShardedDataset(dataset)) | entry), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, five_cases) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("run") / "tiny" / "checkpoints" / "best.pt", five_cases, 3)


def evaluate_command(*args: str, world: int = 1) -> list[str]:
    return (torchrun(world) if world > 1 else [sys.executable]) + ["-m", "unet3d_dist.evaluate", *args]


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"} | env
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def single_process(checkpoint) -> Path:
    """One single-process run, default output folder, NIfTI masks, 3 panels and an offline wandb run."""
    run(
        evaluate_command(
            "--checkpoint", str(checkpoint), "--panels", "3", "--wandb", "offline", "--stitch-device", "cpu"
        )
    )
    return checkpoint.parent.parent / "eval-test"


def test_every_test_case_is_scored_once_and_matches_medpy_on_the_saved_masks(single_process, five_cases, checkpoint):
    rows = read_csv(single_process / "results.csv")
    assert sorted(r["case"] for r in rows) == CASES and {r["class"] for r in rows} == {"box"}
    dataset = ShardedDataset(five_cases)
    for row in rows:
        prediction = load_mask(single_process / "masks" / f"{row['case']}.nii.gz") == 1
        reference = dataset.label(row["case"]) == 1
        spacing = dataset.records[row["case"]]["spacing"]
        assert int(row["pred_voxels"]) == prediction.sum() and int(row["ref_voxels"]) == reference.sum()
        if row["empty"] == "none":
            assert float(row["dice"]) == pytest.approx(medpy.dc(prediction, reference), rel=1e-9)
            assert float(row["hd95_mm"]) == pytest.approx(medpy.hd95(prediction, reference, spacing), rel=1e-6)
            assert float(row["hd95_vox"]) == pytest.approx(medpy.hd95(prediction, reference), rel=1e-6)
        else:
            assert math.isnan(float(row["hd95_mm"])) and math.isnan(float(row["asd_mm"]))
    empty = next(r for r in rows if r["case"] == "empty")
    assert empty["empty"] in ("reference", "both") and float(empty["dice"]) == (
        1.0 if empty["empty"] == "both" else 0.0
    )


def test_masks_carry_the_scan_geometry_and_the_prediction(single_process, five_cases, checkpoint):
    dataset = ShardedDataset(five_cases)
    segmenter = Segmenter.from_checkpoints(read_checkpoints([checkpoint]), torch.device("cpu"))  # as the command
    for case_id in ("small", "border"):
        image = sitk.ReadImage(str(single_process / "masks" / f"{case_id}.nii.gz"))
        record = dataset.records[case_id]
        assert image.GetSize() == tuple(record["shape"])  # (x, y, z) as stored, not transposed
        assert image.GetSpacing() == pytest.approx(record["spacing"]) and image.GetOrigin() == pytest.approx(
            record["origin"]
        )
        expected = segmenter.labels(dataset.image(case_id), record["spacing"], dataset.pad_values(case_id))
        assert np.array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), expected)


def test_json_summary_panels_of_the_worst_cases_and_wandb(single_process):
    results = json.loads((single_process / "results.json").read_text())
    assert [r["case"] for r in results["cases"]] == CASES and results["split"] == "test"
    dice = next(s for s in results["summary"] if s["metric"] == "dice")
    assert dice["n"] == 5 and dice["mean"] == pytest.approx(np.mean([r["dice"] for r in results["cases"]]))
    by_dice = sorted(results["cases"], key=lambda r: (r["dice"], r["case"]))
    assert sorted(p.stem for p in (single_process / "panels").iterdir()) == sorted(r["case"] for r in by_dice[:3])
    for png in (single_process / "panels").iterdir():
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert list((single_process / "wandb").glob("offline-run-*/run-*.wandb")), "no offline wandb run was written"
    assert not (single_process / UNFINISHED).exists()  # removed once results.json is written


def test_two_ranks_evaluate_each_case_exactly_once_with_the_same_values(tmp_path, checkpoint, single_process):
    out = tmp_path / "eval"
    command = evaluate_command(
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--workers",
        "1",
        "--mask-format",
        "hdf5",
        "--panels",
        "0",
        world=2,
    )
    result = run(command, WANDB_MODE="disabled")
    assert "world=2" in result.stdout
    rows = read_csv(out / "results.csv")
    assert [r["case"] for r in rows] == CASES  # each once, none missing
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{c}.h5" for c in CASES]
    single = {r["case"]: r for r in read_csv(single_process / "results.csv")}
    for row in rows:
        assert float(row["dice"]) == pytest.approx(float(single[row["case"]]["dice"]), abs=1e-3)
    assert load_mask(out / "masks" / "small.h5").shape == (12, 10, 6)


def test_a_finished_evaluation_is_not_overwritten(single_process, checkpoint, capsys):
    before = (single_process / "results.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint)])
    assert exit_info.value.code == 2
    assert "already holds a finished evaluation" in capsys.readouterr().err
    assert (single_process / "results.json").read_bytes() == before


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_default_out_holding_the_users_file_is_refused_naming_it_and_left_byte_identical(tmp_path, checkpoint):
    mine = tmp_path / "mine" / "checkpoints" / "best.pt"  # the same checkpoint in a run folder of its own
    mine.parent.mkdir(parents=True)
    mine.write_bytes(checkpoint.read_bytes())
    out = tmp_path / "mine" / "eval-test"
    out.mkdir()
    (out / "results.csv").write_text("case,my own dice\nbig,0.93\n")
    before = files_under(tmp_path)
    result = subprocess.run(evaluate_command("--checkpoint", str(mine)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (
        f"error: --out {out} is not empty and is not an unfinished evaluation (it holds results.csv); choose "
        "another --out, "
        "or pass --overwrite to replace results.json, results.csv, masks/ and panels/ in it (nothing was changed)\n"
    )
    assert files_under(tmp_path) == before and sorted(p.name for p in out.iterdir()) == ["results.csv"]


def test_overwrite_replaces_the_evaluations_own_files_and_keeps_the_others(tmp_path, checkpoint):
    out = tmp_path / "mine"
    (out / "panels").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 5, "train/loss": 0.4}\n')  # as in a training run's folder
    (out / "results.csv").write_text("an old table\n")
    (out / "panels" / "old.png").write_bytes(b"an old panel")
    run(
        evaluate_command(
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--overwrite",
            "--panels",
            "1",
            "--workers",
            "0",
            "--wandb",
            "disabled",
        )
    )
    assert (out / "metrics.jsonl").read_text() == '{"step": 5, "train/loss": 0.4}\n'
    assert [r["case"] for r in read_csv(out / "results.csv")] == CASES
    assert len(list((out / "panels").iterdir())) == 1 and not (out / "panels" / "old.png").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "masks",
        "metrics.jsonl",
        "panels",
        "results.csv",
        "results.json",
        "run.lock",
    ]  # finished: no marker; the lock file stays (its lock went with the process)


def test_a_rerun_over_its_own_interrupted_output_finishes_it_without_leftovers(tmp_path, checkpoint):
    out = tmp_path / "eval"
    (out / "masks").mkdir(parents=True)
    (out / UNFINISHED).write_text("left by a run that was killed\n")
    (out / "masks" / "gone.nii.gz").write_bytes(b"half a mask of a case this run does not score")
    run(
        evaluate_command(
            "--checkpoint", str(checkpoint), "--out", str(out), "--panels", "0", "--workers", "0", "--wandb", "disabled"
        )
    )
    assert json.loads((out / "results.json").read_text())["split"] == "test" and not (out / UNFINISHED).exists()
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{c}.nii.gz" for c in CASES]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--checkpoint", "{missing}"], "checkpoint {missing} does not exist"),
        (
            ["--checkpoint", "{checkpoint}", "--split", "tset"],
            "has no cases in split 'tset'; its splits are: test, train",
        ),
        (
            ["--checkpoint", "{checkpoint}", "--data", "{other}"],
            "has classes ['background', 'liver', 'spleen'] but checkpoint",
        ),
        (["--checkpoint", "{checkpoint}", "--patch", "12", "16", "8"], "--patch must be multiples of 8"),
    ],
)
def test_bad_input_stops_with_one_clear_line(tmp_path, checkpoint, capsys, arguments, message):
    other = tmp_path / "other"
    write_dataset(
        other,
        [box_case("x", (16, 16, 8), None, "test", 0)],
        ["background", "liver", "spleen"],
        name="other",
        modality="CT",
        preprocessing={},
    )
    names = {"missing": tmp_path / "nope.pt", "checkpoint": checkpoint, "other": other}
    out = ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**names) for a in arguments] + out)
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert error.startswith("error: ") and message.format(**names) in error and "\n" not in error
    assert not (tmp_path / "out" / "results.json").exists()


class WritesAFileWhenUnpickled:
    """A checkpoint that runs code when loaded the unsafe way (torch.load without weights_only)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "code ran"))


def test_truncated_and_hostile_checkpoints_are_refused_in_one_line_and_run_nothing(
    tmp_path, checkpoint, capsys, tiny_dataset
):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": WritesAFileWhenUnpickled(tmp_path / "pwned")}, hostile)
    for path in (truncated, hostile):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(path), "--out", str(tmp_path / "out")])
        error = capsys.readouterr().err.strip()
        assert (
            exit_info.value.code == 2
            and error.startswith(f"error: checkpoint {path} cannot be read")
            and "\n" not in error
        )
        resumed = train(tmp_path, tiny_dataset, f"train.resume={path}", "log.run_name=resume", check=False)
        assert resumed.returncode == 2 and resumed.stderr.strip() == error, resumed.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_training_validation_can_score_surface_distances(tmp_path, tiny_dataset):
    train(tmp_path, tiny_dataset, "train.epochs=1", "train.val_distances=true", "log.run_name=distances")
    rows = [json.loads(line) for line in (tmp_path / "distances" / "metrics.jsonl").read_text().splitlines()]
    validation = next(r for r in rows if "val/dice" in r)
    assert {"val/jaccard", "val/hd95_mm", "val/assd_mm", "val/hd_vox"} <= set(validation)
    assert 0 <= validation["val/dice"] <= 1


@pytest.fixture(scope="module")
def other_member(tmp_path_factory, five_cases) -> Path:
    """A second member that looks at volumes its own way: another seed, crop and flips, trained at 2 mm spacing."""
    path = tmp_path_factory.mktemp("run") / "other" / "checkpoints" / "best.pt"
    return write_checkpoint(
        path,
        five_cases,
        5,
        "data.crop=[24,16,16]",
        "data.flip_axes=x",
        "inference.tta_flips=true",
        preprocessing={"spacing": [2.0, 2.0, 2.0]},
    )


def member_probabilities(checkpoint: Path, image: torch.Tensor, record: dict) -> torch.Tensor:
    """One member's softmax on the case's grid, built from the sliding window alone (the ensemble's oracle)."""
    saved = read_checkpoint(checkpoint)
    model, cfg = saved.model(torch.device("cpu")), saved.cfg
    own, spacing = saved.spacing, record["spacing"]
    shape = tuple(image.shape[1:])
    seen = resample_to_shape(image, [round(n * s / o) for n, s, o in zip(shape, spacing, own)]) if own else image
    axes = cfg.data.flip_axis_indices if cfg.inference.tta_flips else ()
    amp = resolve_amp("auto", torch.device("cpu"))  # the command's --amp auto
    logits = sliding_window_logits(
        model,
        seen,
        tuple(cfg.data.crop),
        2,
        pad_value=record["image_min"],
        tta_axes=axes,
        amp_dtype=amp,
        channels_last=cfg.train.channels_last == "on",
    )
    return (resample_to_shape(logits, shape) if own else logits).softmax(0)


def test_an_ensemble_averages_its_members_softmax_each_at_its_own_spacing_on_two_ranks(
    tmp_path, five_cases, checkpoint, other_member
):
    out = tmp_path / "ensemble"
    command = evaluate_command(
        "--checkpoint", str(checkpoint), str(other_member), "--out", str(out), "--panels", "0", world=2
    )
    result = run(command, WANDB_MODE="disabled")
    assert "ensemble of 2 checkpoints" in result.stdout and "patch=16x16x8,24x16x16" in result.stdout
    rows = read_csv(out / "results.csv")
    assert [r["case"] for r in rows] == CASES
    assert json.loads((out / "results.json").read_text())["checkpoints"] == [str(checkpoint), str(other_member)]
    dataset = ShardedDataset(five_cases)
    differs_from_a_member = False
    for case_id in ("big", "wide"):
        image = torch.from_numpy(dataset.image(case_id))
        record = dataset.records[case_id]
        first, second = (member_probabilities(path, image, record) for path in (checkpoint, other_member))
        expected = ((first + second) / 2).argmax(0).numpy()
        assert np.array_equal(load_mask(out / "masks" / f"{case_id}.nii.gz"), expected)
        differs_from_a_member |= any(not np.array_equal(expected, p.argmax(0).numpy()) for p in (first, second))
    assert differs_from_a_member  # else the test could not tell an ensemble from one member


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"classes": ["background", "organ"]}, "they segment different classes (['background', 'box'] and"),
        (
            {"preprocessing": {"normalization": {"kind": "zscore"}}},
            "prepared differently (preprocessing.normalization: None and {'kind': 'zscore'})",
        ),
    ],
)
def test_an_ensemble_of_checkpoints_that_disagree_is_refused_in_one_sentence(
    tmp_path, five_cases, checkpoint, capsys, entry, message
):
    stranger = write_checkpoint(tmp_path / "stranger.pt", five_cases, 4, **entry)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), str(stranger), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert f"checkpoints {checkpoint} and {stranger} cannot form an ensemble: " in error and message in error
    assert not (tmp_path / "out").exists()


def test_an_ensemble_of_folds_is_not_scored_on_a_folds_held_out_cases(tmp_path, five_cases, capsys):
    folds = [
        write_checkpoint(tmp_path / f"fold{k}.pt", five_cases, k, "data.folds=2", f"data.fold={k}") for k in (0, 1)
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", *map(str, folds), "--split", "val", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "which the other members trained on" in capsys.readouterr().err
