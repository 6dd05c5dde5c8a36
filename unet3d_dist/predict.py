"""Prediction on new scans: ``python -m unet3d_dist.predict --checkpoint CKPT [--checkpoint ...] INPUT... [--out DIR]``.

Each input (a NIfTI/NRRD/MHA file or a DICOM series folder, no label; for a model trained on several channels, one
file per channel joined by commas in the checkpoint's channel order, or one 4-D file) goes through the preprocessing
its training data had (the manifest's ``preprocessing``, stored in the checkpoint): reorientation, resampling,
normalisation of each channel. The gaussian sliding window runs with the training crop as its patch (overlap, flip
averaging and largest-component post-processing as the checkpoint's ``inference`` section says; an input smaller than
the patch is padded, and a line says so), and the class map is moved back onto the input's own grid by nearest
neighbour, so ``DIR/<name>_mask.nii.gz`` has the input's exact size, spacing, origin and direction. Voxel values
are indices into the checkpoint's classes. ``DIR/<name>_panel.png`` shows three slices (of the first channel).
``DIR`` defaults to ``<run dir>/predictions`` (``runs/<name>/predictions`` for ``runs/<name>/checkpoints/<file>``).

Several checkpoints predict as one ensemble (``segmenter.py``): the input is prepared like the first member's
training data; a member trained at another spacing sees it resampled to that spacing, with its own patch and flips;
their softmax probabilities, on the first member's grid, are averaged before the argmax.

Under torchrun every rank takes a disjoint, size-balanced share of the inputs; rank 0 holds ``DIR`` (``run.lock``,
run_lock.py) before any rank writes there, so a second prediction into it is refused naming the first. A bad input
(unreadable, or with NaN or infinite voxels, refused as ``prepare`` refuses it) is reported with one sentence and
skipped (exit status 3); nothing is written for it and it does not stop the others.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, CheckpointError, run_dir_of
from .config import ConfigError
from .data.preprocess import (
    CANONICAL_ORIENTATION,
    axes_smaller,
    dims,
    intensity_percentiles,
    reorient,
)
from .data.readers import CaseError, array_xyz, read_channels, strip_suffix
from .dist import gather_to_main, on_main, runtime
from .files import OutputError, atomic_write
from .optional import MissingDependency, require, sitk
from .report import DISPLAY_WINDOWS, slice_panel
from .run_lock import hold_out
from .scoring import balanced_shards
from .segmenter import Segmenter, add_inference_flags, read_checkpoints

EXIT_SKIPPED = 3


Scan = tuple[Path, ...]  # one input: its channels' files (or one file holding them all)


def parse_scan(argument: str) -> Scan:
    """``t1.nii.gz,t2.nii.gz`` -> the files of one scan's channels."""
    return tuple(Path(part) for part in argument.split(","))


def output_paths(inputs: list[Scan], out: Path, overwrite: bool) -> dict[Scan, tuple[Path, Path]]:
    """Input -> (mask, panel) paths, named after its first file; refuses name clashes and, without ``overwrite``,
    existing files."""
    paths: dict[Scan, tuple[Path, Path]] = {}
    by_name: dict[str, Path] = {}
    for scan in inputs:
        name = strip_suffix(scan[0])
        if name in by_name:
            raise CaseError(
                f"inputs {by_name[name]} and {scan[0]} would both write {name}_mask.nii.gz; predict them into "
                "different --out folders"
            )
        by_name[name] = scan[0]
        paths[scan] = (out / f"{name}_mask.nii.gz", out / f"{name}_panel.png")
    existing = [str(p) for pair in paths.values() for p in pair if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more files)" if len(existing) > 1 else ""
        raise CaseError(f"{existing[0]} already exists{more}; pass --overwrite to replace it")
    return paths


def claim_out(inputs: list[Scan], out: Path, overwrite: bool) -> None:
    """Rank 0, before any rank writes: hold ``out`` for this process (run_lock; refused if another job has it or it
    cannot be written), then check its files again now that no other job writes there."""
    hold_out(out)  # held until this process ends
    output_paths(inputs, out, overwrite)


def padding_line(path: object, prepared: sitk.Image, patch: tuple[int, int, int]) -> str | None:
    """The line that tells the user an input is smaller than the patch, so the sliding window pads it."""
    axes = axes_smaller(prepared.GetSize(), patch)
    if not axes:
        return None
    return (
        f"{path}: prepared shape {dims(prepared.GetSize())} is smaller than the patch {dims(patch)} along {axes}, so "
        "it is padded there"
    )


def intensity_line(path: object, channels: list[sitk.Image], trained: Checkpoint) -> str | None:
    """A warning for a scan unlike the training data (another modality, units or scaling): a channel's 0.5 or 99.5
    percentile beyond the training range by more than the range's width. None without a recorded range."""
    if not trained.intensity_range:
        return None
    far = []
    for name, image in zip(trained.channels, channels):
        (low, high), (trained_low, trained_high) = (
            intensity_percentiles(sitk.GetArrayViewFromImage(image)),
            trained.intensity_range[name],
        )
        width = trained_high - trained_low
        if low < trained_low - width or high > trained_high + width:
            far.append(f"{name} {low:g} to {high:g} against {trained_low:g} to {trained_high:g}")
    if not far:
        return None
    return (
        f"warning: {path} has intensities far outside the training data's (0.5 to 99.5 percentile: {'; '.join(far)}), "
        "so its mask may be meaningless"
    )


def predict_file(segmenter: Segmenter, scan: Scan, mask_path: Path, panel_path: Path) -> None:
    """Write the mask NIfTI and the slice panel of one input (each file atomically); say if the input is padded."""
    trained = segmenter.checkpoints[0]
    whose = "the checkpoint was trained on" if len(segmenter.members) == 1 else "the ensemble was trained on"
    channels = read_channels(scan, trained.channels, whose)
    path = scan[0]
    prepared = segmenter.prepare(channels)
    patch = segmenter.members[0].patch
    for line in (intensity_line(path, channels, trained), padding_line(path, prepared[0], patch)):
        if line:
            print(line, flush=True)
    image = channels[0]  # the panel shows the first channel
    mask = segmenter.segment_scan(channels, prepared)
    atomic_write(mask_path, lambda tmp: sitk.WriteImage(mask, str(tmp), useCompression=True))
    # report.slice_panel draws LPS arrays the radiological way
    shown_image, shown_mask = reorient(image, CANONICAL_ORIENTATION), array_xyz(reorient(mask, CANONICAL_ORIENTATION))
    counts = np.bincount(shown_mask.ravel(), minlength=len(segmenter.classes))
    names = [f"{name} ({counts[i]} voxels)" if i else name for i, name in enumerate(segmenter.classes)]
    found = (
        ", ".join(names[1:]) if len(names) == 2 else f"{int((counts[1:] > 0).sum())} of {len(names) - 1} classes found"
    )
    atomic_write(
        panel_path,
        lambda tmp: slice_panel(
            array_xyz(shown_image),
            None,
            shown_mask,
            shown_image.GetSpacing(),
            tmp,
            f"{path.name}: {found}",
            DISPLAY_WINDOWS.get(trained.modality),
            names,
        ),
    )


def input_bytes(scan: Scan) -> int:
    """Size on disk, the load measure for sharing inputs among ranks (a missing input weighs nothing)."""
    total = 0
    for path in scan:
        if path.is_dir():
            total += sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        elif path.is_file():
            total += path.stat().st_size
    return total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="unet3d-predict",
        description="Segment scans with a trained checkpoint; masks come out on each input's own grid.",
        epilog=(
            "example: torchrun --nproc_per_node=4 -m unet3d_dist.predict --checkpoint "
            "runs/ct_liver/checkpoints/best.pt scans/*.nii.gz --out predictions"
        ),
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        required=True,
        help="a checkpoint written by unet3d_dist.train; repeat --checkpoint for each member of an ensemble (their "
        "softmax averaged)",
    )
    parser.add_argument(
        "inputs",
        type=parse_scan,
        nargs="+",
        metavar="INPUT",
        help="NIfTI/NRRD/MHA files or DICOM series folders; for several channels, one file per channel joined by "
        "commas (t1.nii.gz,t2.nii.gz) in the checkpoint's channel order, or one 4-D file",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for <name>_mask.nii.gz and <name>_panel.png (default: <run dir>/predictions; for an ensemble "
        "<runs dir>/ensemble-predictions)",
    )
    add_inference_flags(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing masks and panels")
    return parser.parse_args(argv)


def default_out(checkpoints: list[Path]) -> Path:
    """``runs/<name>/predictions`` for ``runs/<name>/checkpoints/<file>``, beside evaluate's ``eval-<split>``; for an
    ensemble ``runs/ensemble-predictions``, beside its first member's run."""
    if len(checkpoints) > 1:
        return run_dir_of(checkpoints[0]).parent / "ensemble-predictions"
    return run_dir_of(checkpoints[0]) / "predictions"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or default_out(args.checkpoint)
    try:
        if stray := [path for scan in args.inputs for path in scan if path.suffix == ".pt"]:
            raise CaseError(f"input {stray[0]} is a checkpoint; give each member of an ensemble its own --checkpoint")
        require("SimpleITK", "predict (reading scans, writing masks)", "SimpleITK")
        loaded = read_checkpoints(args.checkpoint)
        paths = output_paths(args.inputs, out, args.overwrite)
        with runtime(args.device) as env:
            on_main(env, functools.partial(claim_out, args.inputs, out, args.overwrite), (CaseError, OutputError))
            segmenter = Segmenter.from_checkpoints(loaded, env.device, args)
            rank_prefix = f"rank {env.rank} " if env.world_size > 1 else ""
            failures = []
            scans = {",".join(map(str, scan)): scan for scan in args.inputs}
            shares = balanced_shards({key: input_bytes(scan) for key, scan in scans.items()}, env.world_size)
            for key in shares[env.rank]:
                mask_file, panel_file = paths[scans[key]]
                try:
                    predict_file(segmenter, scans[key], mask_file, panel_file)
                    print(f"{rank_prefix}wrote {mask_file} and {panel_file}", flush=True)
                except CaseError as err:
                    failures.append(str(err))
            gathered = gather_to_main(failures)
    except (CheckpointError, ConfigError, CaseError, MissingDependency, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    failed = [line for part in gathered or [] for line in part]
    for line in failed:
        print(f"skipped: {line}", file=sys.stderr)
    sys.exit(EXIT_SKIPPED if failed else 0)


if __name__ == "__main__":
    main()
