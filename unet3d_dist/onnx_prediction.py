"""Prediction with the exported ONNX files and onnxruntime alone, no PyTorch (``python -m unet3d_dist.onnx_predict``).

The ``--model`` folder holds the ``member-<i>.onnx`` files of ``python -m unet3d_dist.export``. Each input (as for
``unet3d_dist.predict``: a NIfTI/NRRD/MHA file or DICOM series folder, channels joined by commas) is prepared with
the preprocessing the files record, its windows run through onnxruntime and are placed, weighted, flipped and
stitched by ``windows.py``, the very code the PyTorch segmenter runs, so the mask is the one ``predict`` writes
with the same settings (up to float rounding). ``--out/<name>_mask.<ext>`` lies on the input's own grid.

It needs numpy, scipy, h5py (the scan readers'), SimpleITK and onnxruntime, and imports nothing of PyTorch. Members
trained at different spacings are refused: the PyTorch segmenter resamples between them, this predictor does not. A
bad input is skipped with one sentence (exit status 3), as in predict.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .components import keep_largest_component
from .exit_codes import SOME_SKIPPED
from .exported import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    Recorded,
    check_numbering,
    ensemble_problem,
    member_files,
)
from .files import atomic_write, remove_unfinished
from .optional import require, sitk
from .preparation.preprocess import intensity_line, model_input, onto_grid, padding_line
from .preparation.readers import CaseError, array_xyz, image_xyz, read_channels
from .run_lock import hold_out
from .scans import Scan, expand_inputs, output_paths
from .windows import (
    Corner,
    SlabStitcher,
    ensemble_labels,
    flip_sets,
    gaussian_importance,
    pad_to_patch,
    stitched_slabs,
    window_grid,
)


@dataclass(frozen=True)
class OnnxMember:
    """One exported network and what its file records."""

    session: Any  # onnxruntime.InferenceSession
    recorded: Recorded


def load_members(folder: Path, threads: int = 0) -> list[OnnxMember]:
    """The members of an export folder, once they are known to form one ensemble this predictor can run; each
    runs on ``threads`` CPU threads (0: onnxruntime's choice, one per core)."""
    ort = require("onnxruntime", "onnx_predict (running the exported networks)", "onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    paths = member_files(folder)
    members = []
    for path in paths:
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for damaged or foreign files
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"{path} cannot be read by onnxruntime ({reason})") from None
        recorded = Recorded.from_properties(session.get_modelmeta().custom_metadata_map, path)
        members.append(OnnxMember(session, recorded))
    records = [member.recorded for member in members]
    problem = ensemble_problem(records, paths)
    if problem:
        raise ExportError(problem)
    check_numbering(records, paths)
    return members


def window_runner(member: OnnxMember, image: np.ndarray) -> Callable[[list[Corner]], np.ndarray]:
    """A function from window corners to their gaussian-weighted logits, the mean over the recorded flips: the
    numpy side of ``inference.window_runner``."""
    patch = tuple(member.recorded.patch)
    flips = [tuple(2 + axis for axis in axes) for axes in flip_sets(member.recorded.tta_axes)]
    weight = gaussian_importance(patch) / np.float32(len(flips))  # weight and mean over flips

    def run(corners: list[Corner]) -> np.ndarray:
        windows = np.stack([image[:, x : x + patch[0], y : y + patch[1], z : z + patch[2]] for x, y, z in corners])
        out = None
        for axes in flips:
            seen = np.ascontiguousarray(np.flip(windows, axes)) if axes else windows
            (pred,) = member.session.run([OUTPUT_NAME], {INPUT_NAME: seen})
            pred = np.flip(pred, axes) if axes else pred
            out = pred if out is None else out + pred
        return np.ascontiguousarray(out, dtype=np.float32) * weight

    return run


def member_slabs(member: OnnxMember, volume: np.ndarray, pad_values: Sequence[float]) -> Iterator[tuple[int, Any]]:
    """Stitched logits of ``volume`` (C, X, Y, Z) as ``(x, slab)`` pairs along x, padded to the patch with
    ``pad_values`` where it is smaller: the numpy side of ``inference.sliding_window_slabs``."""
    recorded, patch = member.recorded, tuple(member.recorded.patch)
    grid = window_grid(volume.shape[1:], patch, recorded.overlap)
    image = pad_to_patch(volume, patch, pad_values)
    ring = np.zeros((len(recorded.classes), patch[0], *grid.padded[1:]), np.float32)
    divisors = [total.astype(np.float32) for total in grid.divisors]
    run = window_runner(member, image)
    return stitched_slabs(run, grid, SlabStitcher(grid, ring, divisors), recorded.batch_size)


def softmax(logits: np.ndarray) -> np.ndarray:
    from scipy.special import softmax as scipy_softmax

    return scipy_softmax(logits, axis=0)


def segment_scan(members: list[OnnxMember], channels: list[sitk.Image], prepared: list[sitk.Image]) -> sitk.Image:
    """Class map (uint8) of a scan on its own grid, as ``Segmenter.segment_scan`` gives it: prepared like the
    training data, padded with each channel's minimum, the members' mean probability, then the largest component
    of each class where recorded."""
    first = members[0].recorded
    volume = np.stack([array_xyz(channel) for channel in prepared])
    pad_values = volume.reshape(len(volume), -1).min(1).tolist()
    streams = [member_slabs(member, volume, pad_values) for member in members]
    labels = ensemble_labels(volume.shape[1:], streams, softmax)
    if first.largest_component:
        labels = keep_largest_component(labels)
    return onto_grid(image_xyz(labels, like=prepared[0]), channels[0])


def predict_scan(members: list[OnnxMember], scan: Scan, path: Path) -> None:
    first = members[0].recorded
    channels = read_channels(scan, first.channels, "the model was trained on")
    prepared = model_input(channels, first.preprocessing)  # ``prepare(channels)`` of segment_scan
    for line in (
        intensity_line(scan[0], channels, first.channels, first.intensity_range),
        padding_line(scan[0], prepared[0], tuple(first.patch)),
    ):
        if line:
            print(line, flush=True)
    mask = segment_scan(members, channels, prepared)
    atomic_write(path, lambda tmp: sitk.WriteImage(mask, str(tmp), useCompression=True))


def predict_all(args: argparse.Namespace) -> int:
    """A mask for every input; a bad scan is named in one sentence and the others go on. The exit code."""
    require("SimpleITK", "onnx_predict (reading scans, writing masks)", "SimpleITK")
    members = load_members(args.model, args.threads)
    paths = output_paths(expand_inputs(args.inputs, args.input_list, args.out), args.out, args.format, panels=False)
    hold_out(args.out)  # held until this process ends
    remove_unfinished(args.out)
    todo = {scan: mask for scan, (mask, _) in paths.items() if args.overwrite or not mask.exists()}
    if len(todo) < len(paths):
        print(f"{len(paths) - len(todo)} of {len(paths)} scans already have a mask in {args.out}; skipped", flush=True)
    skipped = []
    for scan, path in todo.items():
        try:
            predict_scan(members, scan, path)
            print(f"wrote {path}", flush=True)
        except CaseError as err:
            skipped.append(str(err))
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    return SOME_SKIPPED if skipped else 0
