"""``python -m unet3d_dist.predict`` on real scans, with a checkpoint trained in the test on a prepared dataset."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SHARED_DATA, TINY, free_port, recipe, signal_job, small_cases, start, wait_until_gone
from rich.console import Console

from unet3d_dist.dist import DistEnv, torchrun_command
from unet3d_dist.files import atomic_write_bytes
from unet3d_dist.predict import main
from unet3d_dist.prediction import Plan, ScanProgress, plan_work
from unet3d_dist.preparation.build import prepare
from unet3d_dist.preparation.readers import strip_suffix
from unet3d_dist.preparation.recipe import load_recipe
from unet3d_dist.scans import expand_inputs, output_paths

pytestmark = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the real scans are not at {SHARED_DATA} (set UNET3D_SHARED_DATA)"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One step of a tiny model, validated, on a prepared dataset: the abdominal CT's liver at 12 mm, twice (train,
    val).
    """
    tmp_path = tmp_path_factory.mktemp("predict")
    config = recipe(
        tmp_path,
        preprocessing__spacing=[12, 12, 12],
        preprocessing__crop={"to": "none"},
        splits={"train": 0.5, "val": 0.5},
    )
    dataset = tmp_path / "dataset"
    prepare(
        load_recipe(config),
        [small_cases(tmp_path, 2)],
        dataset,
        jobs=1,
        overwrite=False,
        split_file=None,
        console=Console(quiet=True),
    )
    overrides = [*TINY, "data.crop=[32,32,32]", "data.samples_per_epoch=2", "train.epochs=1"]  # later ones win
    train = [
        sys.executable,
        "-m",
        "unet3d_dist.train",
        f"data.dataset={dataset}",
        f"log.runs_dir={tmp_path}",
        "log.run_name=liver",
        *overrides,
    ]
    result = subprocess.run(train, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(1 train / 1 val cases)" in result.stdout and "validation Dice" in result.stdout
    return tmp_path / "liver/checkpoints/ckpt-00000001.pt"


def test_masks_come_out_on_each_inputs_own_grid_from_two_ranks(checkpoint, tmp_path):
    inputs = [SHARED_DATA / "ct_abdomen/image.nii.gz", SHARED_DATA / "ct_dicom/series"]
    out = tmp_path / "predictions"
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--master-port={free_port()}", "--nproc_per_node=2"]
    result = subprocess.run(
        [
            *torchrun,
            "-m",
            "unet3d_dist.predict",
            "--checkpoint",
            str(checkpoint),
            *map(str, inputs),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(line.split(" wrote ")[0] for line in result.stdout.splitlines() if " wrote " in line) == [
        "rank 0",
        "rank 1",
    ]

    dicom = sitk.ImageSeriesReader()
    dicom.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(inputs[1])))
    for source, name in ((sitk.ReadImage(str(inputs[0])), "image"), (dicom.Execute(), "series")):
        mask = sitk.ReadImage(str(out / f"{name}_mask.nii.gz"))
        assert mask.GetSize() == source.GetSize()
        assert mask.GetSpacing() == pytest.approx(source.GetSpacing(), abs=1e-6)
        assert mask.GetOrigin() == pytest.approx(source.GetOrigin(), abs=1e-4)
        assert mask.GetDirection() == pytest.approx(source.GetDirection(), abs=1e-6)
        assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}
        png = (out / f"{name}_panel.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert result.stdout.splitlines()[-1].startswith("predicted 2 of 2 scans in ")


def predict(checkpoint: Path, *arguments: object) -> subprocess.CompletedProcess:
    """The real command line in its own process, on the CPU."""
    command = [
        sys.executable,
        "-m",
        "unet3d_dist.predict",
        "--checkpoint",
        str(checkpoint),
        *map(str, arguments),
        "--device",
        "cpu",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_an_image_with_nan_voxels_is_skipped_with_prepares_sentence_and_nothing_is_written_for_it(checkpoint, tmp_path):
    source = sitk.ReadImage(str(SHARED_DATA / "ct_abdomen/image.nii.gz"))
    voxels = sitk.GetArrayFromImage(source).astype(np.float32)
    voxels[40:45, 50, 60] = np.nan
    with_nan = sitk.GetImageFromArray(voxels)
    with_nan.CopyInformation(source)
    nan_path = tmp_path / "with_nan.nrrd"  # ITK reads NaN in NIfTI files as 0
    sitk.WriteImage(with_nan, str(nan_path))
    out = tmp_path / "predictions"

    result = predict(checkpoint, nan_path, SHARED_DATA / "ct_abdomen/image.nii.gz", "--out", out)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"skipped: image {nan_path} holds 5 NaN or infinite voxels\n" in result.stderr  # prepare's sentence
    # the good input still is; the lock file stays (its lock went with the process)
    assert sorted(p.name for p in out.iterdir()) == ["image_mask.nii.gz", "image_panel.png", "run.lock"]


def test_one_process_says_which_input_is_padded_and_writes_into_the_run_by_default(checkpoint):
    image = SHARED_DATA / "ct_abdomen/image.nii.gz"  # 30x25x28 voxels at 12 mm, under the 32x32x32 patch
    result = predict(checkpoint, image)
    assert result.returncode == 0, result.stdout + result.stderr
    out = checkpoint.parent.parent / "predictions"
    *lines, summary = result.stdout.splitlines()
    assert lines == [
        f"{image}: prepared shape 30x25x28 is smaller than the patch 32x32x32 along x, y, z, so it is padded there",
        f"wrote {out / 'image_mask.nii.gz'} and {out / 'image_panel.png'}",
    ]
    assert re.fullmatch(r"predicted 1 of 1 scan in \d+\.\d s on 1 rank; 0 already done, 0 failed", summary), summary


@pytest.fixture(scope="module")
def coarser_member(checkpoint, tmp_path_factory) -> Path:
    """A second member trained at 16 mm instead of 12 (the fixture's weights, another seed's head)."""
    saved = torch.load(checkpoint, weights_only=True)
    saved["dataset"]["preprocessing"]["spacing"] = [16.0, 16.0, 16.0]
    torch.manual_seed(7)
    for name, value in saved["model"].items():
        if name.startswith("head"):
            saved["model"][name] = torch.randn_like(value) if value.is_floating_point() else value
    path = tmp_path_factory.mktemp("coarser") / "coarse" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save(saved, path)
    return path


def test_an_ensemble_at_two_spacings_predicts_on_each_inputs_grid_from_two_ranks(checkpoint, coarser_member, tmp_path):
    inputs = [SHARED_DATA / "ct_abdomen/image.nii.gz", SHARED_DATA / "ct_dicom/series"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--master-port={free_port()}", "--nproc_per_node=2"]
    members = ["--checkpoint", str(checkpoint), "--checkpoint", str(coarser_member)]
    result = subprocess.run(
        [*torchrun, "-m", "unet3d_dist.predict", *members, *map(str, inputs), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = checkpoint.parent.parent.parent / "ensemble-predictions"  # beside the first member's run
    alone = predict(checkpoint, inputs[0], "--out", tmp_path / "alone")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    source = sitk.ReadImage(str(inputs[0]))
    ensemble = sitk.ReadImage(str(out / "image_mask.nii.gz"))
    assert ensemble.GetSize() == source.GetSize() and ensemble.GetSpacing() == pytest.approx(source.GetSpacing())
    single = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "alone" / "image_mask.nii.gz")))
    assert not np.array_equal(sitk.GetArrayFromImage(ensemble), single)  # the second member had its say
    assert (out / "series_mask.nii.gz").is_file() and (out / "series_panel.png").is_file()


def test_masks_in_another_format_without_panels_are_kept_by_a_rerun_and_replaced_with_overwrite(checkpoint, tmp_path):
    image, out = SHARED_DATA / "ct_abdomen/image.nii.gz", tmp_path / "predictions"
    first = predict(checkpoint, image, "--out", out, "--format", "mha", "--no-panels")
    assert first.returncode == 0, first.stdout + first.stderr
    mask = out / "image_mask.mha"
    assert f"wrote {mask}\n" in first.stdout and sorted(p.name for p in out.iterdir()) == ["image_mask.mha", "run.lock"]
    source, written = sitk.ReadImage(str(image)), sitk.ReadImage(str(mask))
    assert written.GetSize() == source.GetSize() and written.GetOrigin() == pytest.approx(source.GetOrigin(), abs=1e-4)
    before = mask.stat()

    again = predict(checkpoint, image, "--out", out, "--format", "mha", "--no-panels")
    assert again.returncode == 0 and "wrote" not in again.stdout, again.stdout + again.stderr
    assert again.stdout.splitlines()[-1].startswith("predicted 0 of 1 scan in ")
    assert again.stdout.splitlines()[-1].endswith(" on 1 rank; 1 already done, 0 failed")
    assert (mask.stat().st_ino, mask.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    replaced = predict(checkpoint, image, "--out", out, "--format", "mha", "--no-panels", "--overwrite")
    assert replaced.returncode == 0 and f"wrote {mask}\n" in replaced.stdout, replaced.stdout + replaced.stderr
    assert (
        replaced.stdout.splitlines()[-1].endswith("; 0 already done, 0 failed") and mask.stat().st_ino != before.st_ino
    )


def test_a_checkpoint_given_as_an_input_or_a_mismatched_member_is_refused_in_one_sentence(checkpoint, tmp_path):
    image = SHARED_DATA / "ct_abdomen/image.nii.gz"
    stray = predict(checkpoint, checkpoint, image, "--out", tmp_path / "a")
    assert stray.returncode == 2
    assert (
        stray.stderr
        == f"error: input {checkpoint} is a checkpoint; give each member of an ensemble its own --checkpoint\n"
    )

    saved = torch.load(checkpoint, weights_only=True)
    saved["dataset"]["preprocessing"]["normalization"] = {"kind": "zscore"}
    other = tmp_path / "zscore.pt"
    torch.save(saved, other)
    mismatched = predict(checkpoint, "--checkpoint", other, image, "--out", tmp_path / "b")
    assert mismatched.returncode == 2 and mismatched.stderr.count("\n") == 1
    assert f"checkpoints {checkpoint} and {other} cannot form an ensemble: their training data were prepared " in (
        mismatched.stderr
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_scan_unlike_the_training_data_is_predicted_with_a_warning_and_a_link_loop_or_blank_scan_is_skipped(
    checkpoint, tmp_path
):
    trained = torch.load(checkpoint, weights_only=True)["dataset"]["intensity_range"]
    low, high = trained["image"]
    assert -1100 < low < -900 and 200 < high < 2000  # the abdominal CT's raw HU, before the window
    noise = tmp_path / "noise.nii.gz"  # int16 noise at the type's limits: nothing like a CT
    voxels = np.random.default_rng(0).integers(-32768, 32768, (32, 32, 24)).astype(np.int16)
    voxels[0, 0, :2] = -32768, 32767
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((4.0, 4.0, 4.0))
    sitk.WriteImage(image, str(noise))
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((24, 32, 32), -1024, np.int16)), str(flat))
    loop, normal, out = tmp_path / "loop.nii.gz", SHARED_DATA / "ct_abdomen/image.nii.gz", tmp_path / "predictions"
    loop.symlink_to(loop.name)

    result = predict(checkpoint, noise, loop, flat, normal, "--out", out)
    assert result.returncode == 3 and "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert sorted(result.stderr.splitlines()) == sorted(  # prepare's sentences
        [
            f"skipped: image {flat} has the same value (-1024) in every voxel; expected a scan, not a blank volume",
            f"skipped: {loop} is a symbolic link loop (following its links leads back to it)",
        ]
    )
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: {noise} has intensities far outside the training data's (0.5 to 99.5 percentile: image -3"
    )
    assert f"against {low:g} to {high:g}), so its mask may be meaningless" in warnings[0]
    assert sorted(p.name for p in out.iterdir()) == [
        "image_mask.nii.gz",
        "image_panel.png",
        "noise_mask.nii.gz",
        "noise_panel.png",
        "run.lock",
    ]  # the warned scan's mask is still written; nothing for the loop or the blank scan

    # a checkpoint of a dataset prepared before the range was recorded: no warning, no error
    saved = torch.load(checkpoint, weights_only=True)
    saved["dataset"].pop("intensity_range")
    older = tmp_path / "older.pt"
    torch.save(saved, older)
    result = predict(older, noise, "--out", tmp_path / "older")
    assert result.returncode == 0 and "warning" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_a_folder_gives_its_scans_by_name_and_a_list_file_its_lines(tmp_path):
    scans = tmp_path / "scans"
    (scans / "nested").mkdir(parents=True)
    for name in ("b.nrrd", "a.nii.gz", "c.mha", "notes.txt", ".hidden.nii.gz", "nested/deeper.nii.gz"):
        (scans / name).write_bytes(b"")
    (scans / "series").symlink_to(SHARED_DATA / "ct_dicom/series")  # a DICOM series among the files
    (scans / "predictions").mkdir()  # --out inside the input folder is not a scan
    (scans / "predictions" / "a_mask.nii.gz").write_bytes(b"")
    out = scans / "predictions"
    assert expand_inputs([(scans,)], None, out) == [(scans / n,) for n in ("a.nii.gz", "b.nrrd", "c.mha", "series")]
    # a DICOM series folder given itself stays one scan; a folder of files with a README beside series expands
    series = SHARED_DATA / "ct_dicom/series"
    assert expand_inputs([(series,)], None, out) == [(series,)]
    (scans / "nested" / "README").write_text("scans from the clinic")
    (scans / "nested" / "deeper.nii.gz").unlink()
    (scans / "nested" / "series").symlink_to(series)
    assert expand_inputs([(scans / "nested",)], None, out) == [(scans / "nested" / "series",)]

    listed = tmp_path / "lists" / "scans.txt"
    listed.parent.mkdir()
    listed.write_text(f"# the clinic's scans\n\n../scans/a.nii.gz\n  {scans / 'b.nrrd'}  \nt1.nii.gz, t2.nii.gz\n")
    assert expand_inputs([(scans / "a.nii.gz",)], listed, out) == [
        (scans / "a.nii.gz",),  # named twice, predicted once
        (scans / "b.nrrd",),
        (listed.parent / "t1.nii.gz", listed.parent / "t2.nii.gz"),
    ]


def test_an_empty_folder_or_list_a_folder_that_is_out_or_an_out_that_loops_is_refused_in_one_sentence(
    checkpoint, tmp_path, capsys
):
    empty, listed, missing, out = tmp_path / "empty", tmp_path / "scans.txt", tmp_path / "missing.txt", tmp_path / "out"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("")
    listed.write_text("# nothing yet\n\n")
    refusals = [
        (
            [empty, "--out", out],
            f"input folder {empty} holds no scans; expected NIfTI/NRRD/MHA files or DICOM series folders directly "
            "in it (list scans kept in deeper folders with --input-list)",
        ),
        (
            ["--input-list", listed, "--out", out],
            f"input list {listed} names no scans; expected one scan per line (blank lines and # comments are skipped)",
        ),
        (
            ["--input-list", missing, "--out", out],
            f"input list {missing} does not exist; expected a text file with one scan per line",
        ),
        (
            [empty, "--out", empty],
            f"input folder {empty} is also --out, so its masks would be read as scans; choose another --out",
        ),
    ]
    (tmp_path / "loop").symlink_to("loop")
    refusals.append(
        (
            [empty, "--out", tmp_path / "loop"],
            f"--out {tmp_path / 'loop'} is a symbolic link loop (following its links "
            "leads back to it); choose another --out",
        )
    )
    for arguments, sentence in refusals:
        with pytest.raises(SystemExit) as refused:
            main(["--checkpoint", str(checkpoint), *map(str, arguments)])
        assert (refused.value.code, capsys.readouterr().err) == (2, f"error: {sentence}\n")
    assert not out.exists() and sorted(p.name for p in empty.iterdir()) == ["notes.txt", "sub"]


def small_scans(folder: Path, count: int) -> list[Path]:
    """``count`` different 24x24x24 crops of the real abdominal CT at the checkpoint's 12 mm, as NIfTI, NRRD and MHA
    files, so that each one is predicted in a fraction of a second."""
    source = sitk.ReadImage(str(SHARED_DATA / "ct_abdomen/image.nii.gz"))
    size = [round(n * s / 12) for n, s in zip(source.GetSize(), source.GetSpacing())]  # 30x25x28
    coarse = sitk.Resample(
        source,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        source.GetOrigin(),
        (12.0,) * 3,
        source.GetDirection(),
        -1024.0,
        source.GetPixelID(),
    )
    offsets = [(x, y, z) for z in range(0, 5, 2) for y in (0, 1) for x in range(0, 7, 3)][:count]
    paths = []
    for i, (x, y, z) in enumerate(offsets):
        path = folder / f"scan{i:02d}{('.nii.gz', '.nrrd', '.mha')[i % 3]}"
        sitk.WriteImage(coarse[x : x + 24, y : y + 24, z : z + 24], str(path))
        paths.append(path)
    return paths


def masks_in(out: Path) -> set[Path]:
    """The finished masks in ``out``, not a writer's temporary file (``.tmp-<pid>-<name>``)."""
    return set(out.glob("[!.]*_mask.nii.gz")) if out.is_dir() else set()


def test_a_folder_of_scans_killed_midway_on_two_ranks_is_resumed_writing_only_the_missing_masks(checkpoint, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "predictions"
    scans.mkdir()
    good = small_scans(scans, 12)
    (scans / "series").symlink_to(SHARED_DATA / "ct_dicom/series")  # a DICOM series among the files
    good.append(scans / "series")
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(good[1]))).astype(np.float32)
    voxels[3:5, 10, 10] = np.nan
    bad = scans / "with_nan.nrrd"  # ITK reads NaN in NIfTI files as 0
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(bad))
    (scans / "notes.txt").write_text("not a scan")
    masks = {out / f"{strip_suffix(path)}_mask.nii.gz" for path in good}
    command = [*torchrun_command(2), "-m", "unet3d_dist.predict", "--checkpoint", str(checkpoint), str(scans)]
    command += ["--out", str(out), "--device", "cpu"]

    job = start(command)
    deadline = time.monotonic() + 120
    while len(masks_in(out)) < 3:
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.01)
    wait_until_gone(signal_job(job.pid, signal.SIGKILL), timeout=10)  # the launcher and both ranks, mid-run
    job.communicate()
    done = {mask: (mask.stat().st_ino, mask.stat().st_mtime_ns) for mask in masks_in(out)}
    assert 3 <= len(done) <= len(good) - 2, sorted(done)  # both ranks have work left to share
    (out / ".tmp-4242-scan11_mask.nii.gz").write_bytes(b"half a mask")  # as a kill mid-write leaves it

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    printed = rerun.stdout + rerun.stderr
    assert rerun.returncode == 3 and "Traceback" not in printed, printed
    assert [line for line in rerun.stderr.splitlines() if line.startswith("skipped: ")] == [
        f"skipped: image {bad} holds 2 NaN or infinite voxels"
    ]
    wrote = [line for line in rerun.stdout.splitlines() if " wrote " in line]
    assert {Path(line.split(" wrote ")[1].split(" and ")[0]) for line in wrote} == masks - set(done), printed
    assert {line.split(" wrote ")[0] for line in wrote} == {"rank 0", "rank 1"}  # the rest shared by both ranks
    summary = rerun.stdout.splitlines()[-1]
    assert summary.startswith(f"predicted {len(masks) - len(done)} of 14 scans in ") and summary.endswith(
        f" s on 2 ranks; {len(done)} already done, 1 failed"
    ), printed
    assert {mask: (mask.stat().st_ino, mask.stat().st_mtime_ns) for mask in done} == done  # not written again
    assert masks_in(out) == masks and len(list(out.glob("[!.]*_panel.png"))) == len(masks)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_scans_whose_mask_exists_are_left_out_before_the_rest_is_shared_by_size(tmp_path):
    scans, out = [(tmp_path / f"s{i}.nii.gz",) for i in range(6)], tmp_path / "out"
    for i, (path,) in enumerate(scans):
        path.write_bytes(b"x" * 1000 * (i + 1))
    paths = output_paths(scans, out, "nrrd", panels=False)
    out.mkdir()
    for done in (5, 4, 0):  # the two largest and the smallest
        paths[scans[done]][0].write_bytes(b"")
    plan = plan_work(paths, overwrite=False, world_size=2)
    assert plan.already_done == 3 and paths[scans[0]] == (out / "s0_mask.nrrd", None)
    assert [[scan[0].name for scan, _ in share] for share in plan.shares] == [["s3.nii.gz"], ["s2.nii.gz", "s1.nii.gz"]]
    again = plan_work(paths, overwrite=True, world_size=2)
    assert again.already_done == 0 and sum(map(len, again.shares)) == 6


def test_the_live_bar_counts_every_ranks_new_masks_and_a_log_gets_one_line_per_scan(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    old, new = out / "a_mask.nii.gz", out / "b_mask.nii.gz"
    old.write_bytes(b"an earlier run's mask")  # replaced under --overwrite
    shares = [[((tmp_path / "a.nii.gz",), (old, None))], [((tmp_path / "b.nii.gz",), (new, None))]]
    rank = [DistEnv(r, r, 2, 2, torch.device("cpu")) for r in (0, 1)]
    with ScanProgress(rank[0], Plan(shares, 0, live=True), out) as progress:
        assert progress.written() == 0
        new.write_bytes(b"rank 1's mask")
        assert progress.written() == 1
        atomic_write_bytes(old, b"rank 0's mask")  # a new file under the old name
        progress.wrote(*shares[0][0])
        assert progress.bar.tasks[0].completed == 2 and progress.bar.tasks[0].total == 2
    ScanProgress(rank[1], Plan(shares, 0, live=True), out).wrote(*shares[1][0])  # rank 0's bar says it
    assert capsys.readouterr().out.count("wrote") == 0
    ScanProgress(rank[1], Plan(shares, 0, live=False), out).wrote(*shares[1][0])
    assert capsys.readouterr().out == f"rank 1 wrote {new}\n"
