"""``unet3d_dist.export`` and the torch-free ``unet3d_dist.onnx_predict``: the ONNX predictor, run where PyTorch
cannot be imported, writes the mask the PyTorch segmenter gives with the same settings.

The checkpoints are written, not trained: a fresh tiny network whose full-resolution shortcut path and head are set
to threshold the windowed intensity (HU above about 70: contrast-filled organs and bone), on top of its random
convolutions. The masks follow the anatomy, and the random paths, which see the window's context and its group
statistics, make each window's logits its own, so misplaced, misweighted or misflipped windows would show.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import SimpleITK as sitk
import torch
from conftest import SHARED_DATA
from test_outputs import mounted

from unet3d_dist.checkpoint import inference_checkpoint, read_checkpoint
from unet3d_dist.config import load_config
from unet3d_dist.data.synthetic import SPACING_MM, make_phantom
from unet3d_dist.export import main as export
from unet3d_dist.exported import Recorded
from unet3d_dist.model import ResUNet3D, build_model
from unet3d_dist.onnx_predict import main as onnx_predict
from unet3d_dist.preparation.preprocess import model_input
from unet3d_dist.preparation.readers import array_xyz, image_xyz, read_channels
from unet3d_dist.segmenter import Segmenter, read_checkpoints
from unet3d_dist.windows import pad_to_patch, window_grid

CT = SHARED_DATA / "ct_abdomen" / "image.nii.gz"
WINDOW = [-200, 250]
# The predictor's command line with PyTorch made unimportable; it prints the torch modules it ended up with.
WITHOUT_TORCH = (
    "import atexit, runpy, sys; sys.modules['torch'] = None; "
    "atexit.register(lambda: print('torch modules:', [m for m, v in sys.modules.items() if m.startswith('torch') "
    "and v is not None])); sys.argv = ['onnx_predict', *sys.argv[1:]]; "
    "runpy.run_module('unet3d_dist.onnx_predict', run_name='__main__')"
)


def threshold(model: ResUNet3D, gain: float, cut: float) -> None:
    """Set the network's full-resolution shortcuts and head so that it says foreground where the normalised
    intensity is above ``cut`` (the random convolutions add their say)."""
    with torch.no_grad():
        first, last, head = model.encoders[0].shortcut.weight, model.decoders[0].shortcut.weight, model.heads[0]
        first.zero_()
        first[0, 0], first[1, 0] = gain, -gain  # leaky(gain * x) and leaky(-gain * x)
        last.zero_()
        skip = last.shape[1] // 2  # the decoder sees [upsampled, skip]
        last[0, skip], last[1, skip + 1] = 1, 1
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1, 0], head.weight[1, 1], head.bias[1] = 1, -1, -gain * cut


def write_checkpoint(path: Path, seed: int, crop: str, flip_axes: str, spacing: float, cut: float = 0.2) -> Path:
    """An inference checkpoint of a tiny thresholding network (see the module docstring), flip TTA recorded on."""
    settings = [
        "model.widths=[4,8,8,16]",
        f"data.crop={crop}",
        f"data.flip_axes={flip_axes}",
        "inference.tta_flips=true",
    ]
    cfg = load_config(None, settings)
    torch.manual_seed(seed)
    model = build_model(cfg.model, 1, 2)
    threshold(model, 20.0, cut)
    dataset = {
        "classes": ["background", "liver"],
        "modality": "CT",
        "preprocessing": {"normalization": {"kind": "ct_window", "window": WINDOW}, "spacing": [spacing] * 3},
        "intensity_range": {"image": [-1000.0, 400.0]},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(inference_checkpoint(model, cfg, dataset), path)
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """Two members at 4.5 mm with other patches, flips and thresholds."""
    root = tmp_path_factory.mktemp("members")
    return [
        write_checkpoint(root / "a.pt", 1, "[16,16,16]", "xz", 4.5),
        write_checkpoint(root / "b.pt", 2, "[24,24,16]", "y", 4.5, cut=0.25),
    ]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """A synthetic abdominal CT (HU, 3 mm) as a NIfTI scan."""
    hu, _ = make_phantom(np.random.default_rng([7, 0]), (80, 72, 56))
    path = tmp_path_factory.mktemp("scans") / "phantom.nii.gz"
    sitk.WriteImage(image_xyz(hu, spacing=(SPACING_MM,) * 3), str(path))
    return path


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """PyTorch on one thread: on a busy machine its threads spin on these tiny windows (40 times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def predict_without_torch(*arguments: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", WITHOUT_TORCH, *map(str, arguments), "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "torch modules: []"
    return result


def reference_mask(checkpoints: list[Path], scan: Path, **flags: object) -> np.ndarray:
    """The PyTorch segmenter's mask of ``scan`` with the export's inference ``flags``, in float32."""
    loaded = read_checkpoints(checkpoints)
    segmenter = Segmenter.from_checkpoints(loaded, torch.device("cpu"), argparse.Namespace(amp="off", **flags))
    mask = segmenter.segment_scan(read_channels((scan,), loaded[0].channels, "the test"))
    return sitk.GetArrayFromImage(mask)


def compare_masks(reference: np.ndarray, mask_path: Path, what: str) -> None:
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path)))
    disagreement = float((mask != reference).mean())
    print(f"{what}: foreground {reference.mean():.2%} (PyTorch), voxels that differ {disagreement:.2e}")
    assert reference.shape == mask.shape and reference.mean() >= 0.01
    assert disagreement <= 1e-4


def logit_difference(export_dir: Path, checkpoint: Path, scan: Path) -> float:
    """The largest difference between onnxruntime's and PyTorch's logits on four windows of the prepared scan,
    spread over its window grid."""
    trained = read_checkpoint(checkpoint)
    recorded = Recorded.from_properties(onnx_properties(export_dir / "member-0.onnx"), "member-0")
    volume = np.stack(
        [array_xyz(c) for c in model_input(read_channels((scan,), ["image"], "x"), trained.preprocessing)]
    )
    patch = recorded.patch
    image = pad_to_patch(volume, patch, volume.reshape(len(volume), -1).min(1).tolist())
    corners = window_grid(volume.shape[1:], patch, recorded.overlap).corners
    picked = [corners[i] for i in np.linspace(0, len(corners) - 1, 4).astype(int)]
    windows = np.stack([image[:, x : x + patch[0], y : y + patch[1], z : z + patch[2]] for x, y, z in picked])
    session = ort.InferenceSession(str(export_dir / "member-0.onnx"), providers=["CPUExecutionProvider"])
    (ours,) = session.run(["logits"], {"image": windows})
    with torch.no_grad():
        theirs = trained.model(torch.device("cpu"))(torch.from_numpy(windows)).numpy()
    return float(np.abs(ours - theirs).max())


def onnx_properties(path: Path) -> dict[str, str]:
    return {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}


def test_an_exported_ensemble_segments_the_phantom_without_torch_as_pytorch_does(members, phantom, tmp_path, capsys):
    out = tmp_path / "exported"
    flags = ["--overlap", "0.5", "--largest-component", "--batch-size", "3"]
    export([*(arg for member in members for arg in ("--checkpoint", str(member))), "--out", str(out), *flags])
    assert capsys.readouterr().out.startswith(f"wrote {out / 'member-0.onnx'} (logits within ")
    assert sorted(p.name for p in out.iterdir()) == ["member-0.onnx", "member-1.onnx", "run.lock"]

    for index, (checkpoint, patch, axes) in enumerate(zip(members, ([16, 16, 16], [24, 24, 16]), ([0, 2], [1]))):
        path, trained = out / f"member-{index}.onnx", read_checkpoint(checkpoint)
        recorded = Recorded.from_properties(onnx_properties(path), path)
        assert recorded == Recorded(
            member=index,
            members=2,
            classes=trained.classes,
            channels=["image"],
            modality="CT",
            spacing=[4.5] * 3,
            preprocessing=trained.preprocessing,
            patch=patch,
            tta_axes=axes,
            overlap=0.5,
            batch_size=3,
            largest_component=True,
            intensity_range=trained.intensity_range,
            checkpoint=str(checkpoint),
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.get_modelmeta().custom_metadata_map == onnx_properties(path)  # what the predictor reads
        assert [tuple(i.shape) for i in session.get_inputs()] == [("batch", 1, *patch)]

    difference = logit_difference(out, members[0], phantom)
    print(f"phantom: largest logit difference onnxruntime - PyTorch {difference:.2e}")
    assert difference < 1e-3

    result = predict_without_torch("--model", out, phantom, "--out", tmp_path / "masks")
    assert result.stdout.splitlines()[0] == f"wrote {tmp_path / 'masks' / 'phantom_mask.nii.gz'}"
    reference = reference_mask(members, phantom, overlap=0.5, largest_component=True, batch_size=3)
    compare_masks(reference, tmp_path / "masks" / "phantom_mask.nii.gz", "phantom")
    written = (tmp_path / "masks" / "phantom_mask.nii.gz").stat().st_mtime_ns
    again = predict_without_torch("--model", out, phantom.parent, "--out", tmp_path / "masks")  # the folder, resumed
    assert f"1 of 1 scans already have a mask in {tmp_path / 'masks'}; skipped" in again.stdout
    assert (tmp_path / "masks" / "phantom_mask.nii.gz").stat().st_mtime_ns == written


@pytest.mark.skipif(not CT.is_file(), reason=f"the real CT is not at {CT} (set UNET3D_SHARED_DATA)")
def test_the_real_ct_padded_to_a_larger_patch_gets_pytorchs_mask_without_torch(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "ct.pt", 3, "[32,32,32]", "x", 6.0)
    out = tmp_path / "exported"
    export(["--checkpoint", str(checkpoint), "--out", str(out), "--patch", "64", "64", "64"])  # 61x50x56 at 6 mm
    capsys.readouterr()
    difference = logit_difference(out, checkpoint, CT)
    print(f"CT: largest logit difference onnxruntime - PyTorch {difference:.2e}")
    assert difference < 1e-3

    result = predict_without_torch("--model", out, CT, "--out", tmp_path / "masks", "--format", "nrrd")
    assert f"{CT}: prepared shape 61x50x56 is smaller than the patch 64x64x64 along x, y, z" in result.stdout
    mask = sitk.ReadImage(str(tmp_path / "masks" / "image_mask.nrrd"))
    scan = sitk.ReadImage(str(CT))
    assert mask.GetSize() == scan.GetSize() and mask.GetSpacing() == pytest.approx(scan.GetSpacing())
    compare_masks(reference_mask([checkpoint], CT, patch=[64, 64, 64]), tmp_path / "masks" / "image_mask.nrrd", "CT")


def refusal(command, argv: list[object], capsys) -> str:
    """The one line a command that exits 2 prints."""
    with pytest.raises(SystemExit) as exit_info:
        command([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_missing_or_corrupt_model_and_a_missing_checkpoint_or_onnx_are_one_sentence(
    members, phantom, tmp_path, capsys, monkeypatch
):
    masks = tmp_path / "masks"
    assert refusal(onnx_predict, ["--model", tmp_path / "nowhere", phantom, "--out", masks], capsys) == (
        f"error: --model {tmp_path / 'nowhere'} does not exist"
    )
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "member-0.onnx").write_bytes(b"\x08\x07not an onnx model" * 10)
    assert refusal(onnx_predict, ["--model", corrupt, phantom, "--out", masks], capsys).startswith(
        f"error: {corrupt / 'member-0.onnx'} cannot be read by onnxruntime ("
    )
    assert not masks.exists()

    missing = tmp_path / "missing.pt"
    assert refusal(export, ["--checkpoint", missing, "--out", tmp_path / "a"], capsys) == (
        f"error: checkpoint {missing} does not exist"
    )
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert refusal(export, ["--checkpoint", members[0], "--out", tmp_path / "b"], capsys) == (
        "error: export (writing ONNX files) needs the Python package onnx, which is not installed here (pip install "
        "onnx)"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_missing_scan_is_skipped_and_a_read_only_out_refused_by_export_and_predictor(
    members, phantom, tmp_path, capsys
):
    export(["--checkpoint", str(members[0]), "--out", str(tmp_path / "exported")])
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(SystemExit) as skipped:
        onnx_predict(["--model", str(tmp_path / "exported"), str(missing), "--out", str(tmp_path / "masks")])
    assert skipped.value.code == 3 and capsys.readouterr().err == f"skipped: {missing} does not exist\n"

    source = tmp_path / "source"
    source.mkdir()
    with mounted(tmp_path / "read-only", "--bind", "-o", "ro", str(source)) as read_only:
        for command, argv in (
            (export, ["--checkpoint", members[0], "--out", read_only / "out"]),
            (onnx_predict, ["--model", tmp_path / "exported", phantom, "--out", read_only / "out"]),
        ):
            assert refusal(command, argv, capsys) == (
                f"error: --out {read_only / 'out'} is on a read-only file system; set --out to a writable folder"
            )


def test_members_at_other_spacings_or_of_an_earlier_export_are_refused(members, phantom, tmp_path, capsys):
    coarse = read_checkpoint(members[1]).state
    coarse["dataset"]["preprocessing"]["spacing"] = [6.0] * 3
    torch.save(coarse, tmp_path / "coarse.pt")
    both = ["--checkpoint", members[0], "--checkpoint", tmp_path / "coarse.pt"]
    assert refusal(export, [*both, "--out", tmp_path / "both"], capsys) == (
        f"error: members {members[0]} and {tmp_path / 'coarse.pt'} were trained at different spacings ([4.5, 4.5, "
        "4.5] and [6.0, 6.0, 6.0] mm); the ONNX predictor does not resample between members as the PyTorch segmenter "
        "does, so segment with unet3d_dist.predict or export members of one spacing"
    )

    for name, checkpoint in (("fine", members[0]), ("coarse", tmp_path / "coarse.pt")):
        export(["--checkpoint", str(checkpoint), "--out", str(tmp_path / name)])
    joined = tmp_path / "joined"  # two single exports put side by side by hand
    joined.mkdir()
    shutil.copy(tmp_path / "fine" / "member-0.onnx", joined / "member-0.onnx")
    shutil.copy(tmp_path / "coarse" / "member-0.onnx", joined / "member-1.onnx")
    assert "were trained at different spacings" in refusal(
        onnx_predict, ["--model", joined, phantom, "--out", tmp_path / "masks"], capsys
    )
    shutil.copy(tmp_path / "fine" / "member-0.onnx", joined / "member-1.onnx")
    assert refusal(onnx_predict, ["--model", joined, phantom, "--out", tmp_path / "masks"], capsys) == (
        f"error: {joined / 'member-0.onnx'} was exported as member 0 of 1, but the folder holds member-0.onnx, "
        "member-1.onnx; export the ensemble into an empty folder (or with --overwrite)"
    )

    assert refusal(export, ["--checkpoint", members[0], "--out", joined], capsys) == (
        f"error: {joined / 'member-0.onnx'} already exists; pass --overwrite to replace the export in {joined}"
    )
    export(["--checkpoint", str(members[0]), "--out", str(joined), "--overwrite"])
    assert sorted(p.name for p in joined.iterdir()) == ["member-0.onnx", "run.lock"]  # the left-over member is gone


def test_pt2_holds_the_same_network_and_metadata(members, tmp_path, capsys):
    export(["--checkpoint", str(members[1]), "--out", str(tmp_path), "--pt2", "--no-tta"])
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'member-0.pt2'}"
    extra = {"metadata.json": ""}
    program = torch.export.load(tmp_path / "member-0.pt2", extra_files=extra)
    assert extra["metadata.json"] == json.dumps(onnx_properties(tmp_path / "member-0.onnx"))
    assert Recorded.from_properties(onnx_properties(tmp_path / "member-0.onnx"), "member-0").tta_axes == []
    windows = torch.randn(3, 1, 24, 24, 16)
    with torch.no_grad():
        assert torch.equal(program.module()(windows), read_checkpoint(members[1]).model(torch.device("cpu"))(windows))
