"""Prediction on new scans: ``python -m unet3d_dist.predict --checkpoint CKPT [--checkpoint ...] INPUT... [--out DIR]``.

Each input (a NIfTI/NRRD/MHA file or a DICOM series folder, no label) goes through the preprocessing its training
data had (the manifest's ``preprocessing``, stored in the checkpoint): reorientation, resampling, normalisation. The
gaussian sliding window runs with the training crop as its patch (overlap, flip averaging and largest-component
post-processing as the checkpoint's ``inference`` section says; an input smaller than the patch is padded, and a line
says so), and the class map is moved back onto the input's own grid by nearest neighbour, so
``DIR/<name>_mask.nii.gz`` has the input's exact size, spacing, origin and direction. Voxel values are indices into
the checkpoint's classes. ``DIR/<name>_panel.png`` shows three slices. ``DIR`` defaults to ``<run dir>/predictions``
(``runs/<name>/predictions`` for ``runs/<name>/checkpoints/<file>``).

Several checkpoints predict as one ensemble (``ensemble.py``): each member on the input prepared at its own
spacing, with its own patch and flips; their softmax probabilities, on the first member's grid, are averaged before
the argmax.

Under torchrun every rank takes a disjoint, size-balanced share of the inputs. A bad input (unreadable, or with NaN
or infinite voxels, refused as ``prepare`` refuses it) is reported with one sentence and skipped (exit status 3);
nothing is written for it and it does not stop the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from .checkpoint import CheckpointError, run_dir_of
from .config import ConfigError
from .data.preprocess import CANONICAL_ORIENTATION, axes_smaller, dims, model_input, onto_grid, reorient
from .data.readers import CaseError, array_xyz, check_finite, image_xyz, read_image, strip_suffix
from .dist import gather_to_main, runtime
from .ensemble import Loaded, Member, build_members, mean_probabilities, read_checkpoints
from .files import atomic_write
from .inference import keep_largest_component, predict_labels, resample_to_shape, sliding_window_logits
from .precision import resolve_amp
from .report import DISPLAY_WINDOWS, slice_panel
from .scoring import balanced_shards

EXIT_SKIPPED = 3


class Predictor:
    """Trained models (one, or an ensemble) with the preprocessing and patches their training used."""

    def __init__(self, loaded: list[Loaded], device: torch.device, overlap: float | None, batch_size: int | None):
        first, cfg = loaded[0], loaded[0].cfg
        self.inference = cfg.inference
        self.classes: list[str] = first.dataset["classes"]
        self.modality: str = first.dataset.get("modality", "")
        self.preprocessing: list[dict[str, Any]] = [item.dataset["preprocessing"] for item in loaded]
        if "normalization" not in self.preprocessing[0]:
            raise CheckpointError(
                f"checkpoint {first.path}'s dataset records no preprocessing.normalization, so new scans cannot be "
                "prepared like its training data"
            )
        self.members = build_members(loaded, device)
        self.patch = self.members[0].patch
        self.device, self.batch_size = device, batch_size or cfg.inference.batch_size
        self.overlap = cfg.inference.overlap if overlap is None else overlap
        self.amp_dtype = resolve_amp("auto", device)

    def prepare(self, image: sitk.Image) -> sitk.Image:
        """``image`` on the grid and scale the (first) network was trained on."""
        return model_input(image, self.preprocessing[0])

    def mask(self, image: sitk.Image, prepared: sitk.Image) -> sitk.Image:
        """Class map on ``image``'s own grid (uint8), predicted on ``prepared`` (``self.prepare(image)``); a member
        trained at another spacing predicts on the image prepared at its spacing, resampled onto ``prepared``."""
        shape = tuple(array_xyz(prepared).shape)

        def member_logits(member: Member, preprocessing: dict[str, Any]) -> torch.Tensor:
            same_grid = preprocessing.get("spacing") == self.preprocessing[0].get("spacing")
            voxels = torch.from_numpy(array_xyz(prepared if same_grid else model_input(image, preprocessing)))
            logits = sliding_window_logits(
                member.model,
                voxels[None],
                member.patch,
                len(self.classes),
                overlap=self.overlap,
                batch_size=self.batch_size,
                pad_value=float(voxels.min()),
                amp_dtype=self.amp_dtype,
                device=self.device,
                tta_axes=member.tta_axes,
                channels_last=member.channels_last,
            )
            return resample_to_shape(logits, shape) if tuple(logits.shape[1:]) != shape else logits

        probabilities = mean_probabilities(map(member_logits, self.members, self.preprocessing))
        labels = predict_labels(probabilities)
        if self.inference.largest_component:
            labels = keep_largest_component(labels)
        return onto_grid(image_xyz(labels, like=prepared), image)


def output_paths(inputs: list[Path], out: Path, overwrite: bool) -> dict[Path, tuple[Path, Path]]:
    """Input -> (mask, panel) paths; refuses name clashes and, without ``overwrite``, existing files."""
    paths: dict[Path, tuple[Path, Path]] = {}
    by_name: dict[str, Path] = {}
    for path in inputs:
        name = strip_suffix(path)
        if name in by_name:
            raise CaseError(
                f"inputs {by_name[name]} and {path} would both write {name}_mask.nii.gz; predict them into "
                "different --out folders"
            )
        by_name[name] = path
        paths[path] = (out / f"{name}_mask.nii.gz", out / f"{name}_panel.png")
    existing = [str(p) for pair in paths.values() for p in pair if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more files)" if len(existing) > 1 else ""
        raise CaseError(f"{existing[0]} already exists{more}; pass --overwrite to replace it")
    return paths


def padding_line(path: Path, prepared: sitk.Image, patch: tuple[int, int, int]) -> str | None:
    """The line that tells the user an input is smaller than the patch, so the sliding window pads it."""
    axes = axes_smaller(prepared.GetSize(), patch)
    if not axes:
        return None
    return (
        f"{path}: prepared shape {dims(prepared.GetSize())} is smaller than the patch {dims(patch)} along {axes}, so "
        "it is padded there"
    )


def predict_file(predictor: Predictor, path: Path, mask_path: Path, panel_path: Path) -> None:
    """Write the mask NIfTI and the slice panel of one input (each file atomically); say if the input is padded."""
    image = read_image(path)
    check_finite(image, path)
    prepared = predictor.prepare(image)
    if line := padding_line(path, prepared, predictor.patch):
        print(line, flush=True)
    mask = predictor.mask(image, prepared)
    atomic_write(mask_path, lambda tmp: sitk.WriteImage(mask, str(tmp), useCompression=True))
    # report.slice_panel draws LPS arrays the radiological way
    shown_image, shown_mask = reorient(image, CANONICAL_ORIENTATION), array_xyz(reorient(mask, CANONICAL_ORIENTATION))
    found = ", ".join(f"{name} {int((shown_mask == i).sum())} voxels" for i, name in enumerate(predictor.classes) if i)
    atomic_write(
        panel_path,
        lambda tmp: slice_panel(
            array_xyz(shown_image),
            None,
            shown_mask,
            shown_image.GetSpacing(),
            tmp,
            f"{path.name}: {found}",
            DISPLAY_WINDOWS.get(predictor.modality),
        ),
    )


def input_bytes(path: Path) -> int:
    """Size on disk, the load measure for sharing inputs among ranks (a missing input weighs nothing)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size if path.is_file() else 0


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
        "inputs", type=Path, nargs="+", metavar="INPUT", help="NIfTI/NRRD/MHA files or DICOM series folders"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for <name>_mask.nii.gz and <name>_panel.png (default: <run dir>/predictions; for an ensemble "
        "<runs dir>/ensemble-predictions)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the local rank's GPU if there is one"
    )
    parser.add_argument(
        "--overlap",
        type=float,
        help="sliding-window overlap as a fraction of the patch (default: the checkpoint's inference.overlap)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="windows per forward pass (default: the checkpoint's inference.batch_size)"
    )
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
        if stray := [path for path in args.inputs if path.suffix == ".pt"]:
            raise CaseError(f"input {stray[0]} is a checkpoint; give each member of an ensemble its own --checkpoint")
        loaded = read_checkpoints(args.checkpoint)
        paths = output_paths(args.inputs, out, args.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        with runtime(args.device) as env:
            predictor = Predictor(loaded, env.device, args.overlap, args.batch_size)
            rank_prefix = f"rank {env.rank} " if env.world_size > 1 else ""
            failures = []
            for name in balanced_shards({str(p): input_bytes(p) for p in args.inputs}, env.world_size)[env.rank]:
                mask_file, panel_file = paths[Path(name)]
                try:
                    predict_file(predictor, Path(name), mask_file, panel_file)
                    print(f"{rank_prefix}wrote {mask_file} and {panel_file}", flush=True)
                except CaseError as err:
                    failures.append(str(err))
            gathered = gather_to_main(failures)
    except (CheckpointError, ConfigError, CaseError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    failed = [line for part in gathered or [] for line in part]
    for line in failed:
        print(f"skipped: {line}", file=sys.stderr)
    sys.exit(EXIT_SKIPPED if failed else 0)


if __name__ == "__main__":
    main()
