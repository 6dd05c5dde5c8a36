"""Export of checkpoints for runtimes without PyTorch (``python -m unet3d_dist.export``).

Each checkpoint becomes ``DIR/member-<i>.onnx``: the network in eval mode (the full-resolution head only), input
``image`` (batch, channels, *patch) float32 with a dynamic batch axis, output ``logits`` (batch, classes, *patch).
Its metadata_props record what ``python -m unet3d_dist.onnx_predict`` needs to segment a scan as
``unet3d_dist.predict`` would (``exported.Recorded``): classes, channels, the training data's preprocessing and
spacing, and the inference settings the inference flags chose (patch, flip TTA axes, overlap, batch size, largest
component), each defaulting to what the checkpoint recorded, as in predict. Group and instance norms go out staged
(``staged_norm.py``), and every file is checked against PyTorch with onnxruntime on random windows before it is
written, atomically. ``--pt2`` also writes ``member-<i>.pt2`` (``torch.export``, the same metadata in its
``metadata.json`` extra file) for PyTorch runtimes.

The flags --amp, --device and --stitch-device do not apply: the export runs on the CPU and the exported network
computes in float32, whatever --amp says.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .exported import INPUT_NAME, OUTPUT_NAME, ExportError, Recorded, ensemble_problem, member_file
from .files import OutputError, atomic_write, atomic_write_bytes
from .optional import require
from .run_lock import hold_out, removed_if_left_empty
from .segmenter import Segmenter, read_checkpoints
from .staged_norm import with_staged_norms

OPSET = 17
TOLERANCE = 1e-4  # largest logit difference to PyTorch on the check windows, per unit of the largest logit (>= 1)
EXAMPLE_WINDOWS, CHECK_WINDOWS = 2, 3  # traced with one batch size, checked with another: the batch axis is dynamic
EXPORTED = re.compile(r"^member-\d+\.(onnx|pt2)$")
# torch 2.5 added the dynamo exporter (the default from 2.9), which needs onnxscript; before, the legacy one was all
LEGACY = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def records(segmenter: Segmenter) -> list[Recorded]:
    """What each member's file records: its checkpoint's data and the settings the segmenter chose."""
    _ = segmenter.preprocessing  # refuses checkpoints whose training scans' preparation is not recorded
    settings, count = segmenter.settings, len(segmenter.members)
    return [
        Recorded(
            member=index,
            members=count,
            classes=list(segmenter.classes),
            channels=checkpoint.channels,
            modality=checkpoint.modality,
            spacing=list(checkpoint.spacing) if checkpoint.spacing else None,
            preprocessing=checkpoint.preprocessing,
            patch=list(member.patch),
            tta_axes=list(member.tta_axes),
            overlap=settings.overlap,
            batch_size=settings.batch_size,
            largest_component=settings.largest_component,
            intensity_range=checkpoint.intensity_range,
            checkpoint=str(checkpoint.path),
        )
        for index, (member, checkpoint) in enumerate(zip(segmenter.members, segmenter.checkpoints))
    ]


def example_windows(record: Recorded, count: int = EXAMPLE_WINDOWS) -> torch.Tensor:
    """Seeded random windows: the export's example input and the check's."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn((count, len(record.channels), *record.patch), generator=generator)


def onnx_bytes(model: nn.Module, record: Recorded) -> bytes:
    """The eval-mode network as an ONNX model (the legacy TorchScript exporter: it needs no onnxscript), its norms
    staged (``staged_norm.py``), with a dynamic batch axis and ``record`` in its metadata_props."""
    onnx = require("onnx", "export (writing ONNX files)", "onnx")
    data = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer's notes on the model's shape check, and the legacy exporter's deprecation notice
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            with_staged_norms(model).eval(),
            (example_windows(record),),
            data,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            **LEGACY,
        )
    exported = onnx.load_from_string(data.getvalue())
    onnx.helper.set_model_props(exported, record.properties())
    return exported.SerializeToString()


def logit_difference(model: nn.Module, data: bytes, windows: torch.Tensor) -> tuple[float, float]:
    """The largest absolute difference between onnxruntime's and PyTorch's logits of ``windows``, and the largest
    absolute logit: float32 rounding grows with the logits."""
    ort = require("onnxruntime", "export (checking the ONNX files)", "onnxruntime")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (ours,) = session.run([OUTPUT_NAME], {INPUT_NAME: windows.numpy()})
    with torch.no_grad():
        reference = model.eval()(windows).float().numpy()
    return float(np.abs(ours - reference).max()), float(np.abs(reference).max())


def write_pt2(model: nn.Module, record: Recorded, path: Path) -> None:
    """The network as a ``torch.export`` program with a dynamic batch axis; ``metadata.json`` holds the ONNX file's
    metadata_props, so ``Recorded.from_properties`` reads both."""
    batch = {0: torch.export.Dim("batch")}
    program = torch.export.export(model.eval(), (example_windows(record),), dynamic_shapes=(batch,))
    metadata = {"metadata.json": json.dumps(record.properties())}
    atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files=metadata))


def export_members(segmenter: Segmenter, recorded: list[Recorded], out: Path, pt2: bool) -> None:
    """Write every member's file into ``out``, each checked against PyTorch first; say what was written."""
    for member, record in zip(segmenter.members, recorded):
        path = out / member_file(record.member)
        data = onnx_bytes(member.model, record)
        difference, largest = logit_difference(member.model, data, example_windows(record, CHECK_WINDOWS))
        if not difference <= TOLERANCE * max(1.0, largest):
            raise ExportError(
                f"the ONNX export of {record.checkpoint} computes other logits than PyTorch (largest difference "
                f"{difference:.3g} on logits up to {largest:.3g}, allowed {TOLERANCE:g} of that), so it is not written"
            )
        atomic_write_bytes(path, data)
        print(f"wrote {path} (logits within {difference:.1e} of PyTorch's)", flush=True)
        if pt2:
            write_pt2(member.model, record, path.with_suffix(".pt2"))
            print(f"wrote {path.with_suffix('.pt2')}", flush=True)


def claim_out(out: Path, overwrite: bool) -> None:
    """Hold ``out`` (run_lock) and clear an earlier export there, which only ``overwrite`` allows: its left-over
    members would otherwise join this ensemble."""
    hold_out(out)  # held until this process ends
    earlier = sorted(path for path in out.iterdir() if EXPORTED.match(path.name))
    if earlier and not overwrite:
        raise OutputError(f"{earlier[0]} already exists; pass --overwrite to replace the export in {out}")
    for path in earlier:
        path.unlink()


def export(args: argparse.Namespace) -> None:
    """One ONNX file (and with --pt2 a torch.export program) per member, checked against PyTorch before it is kept."""
    args = argparse.Namespace(**{**vars(args), "amp": "off"})  # the file computes in float32 whatever --amp says
    require("onnx", "export (writing ONNX files)", "onnx")
    require("onnxruntime", "export (checking the ONNX files)", "onnxruntime")
    loaded = read_checkpoints(args.checkpoint)
    segmenter = Segmenter.from_checkpoints(loaded, torch.device("cpu"), args)
    recorded = records(segmenter)
    problem = ensemble_problem(recorded, args.checkpoint)
    if problem:
        raise ExportError(problem)
    with removed_if_left_empty(args.out):
        claim_out(args.out, args.overwrite)
        export_members(segmenter, recorded, args.out, args.pt2)
