"""Evaluation benchmarks: ``python -m unet3d_dist.bench eval [--part metrics|window|stitch|all]``.

- metrics: our per-class metrics (one call: Dice ... HD in mm and voxels) against medpy's asd, assd, hd95 and hd on
  a 256x256x200 volume holding an organ-sized object; also checks that the values are identical.
- window: our sliding window against MONAI's ``sliding_window_inference`` (``pip install -e .[bench]``) with the same
  model, patch, overlap, batch and gaussian weighting, once with an echo model (stitching cost alone) and once with
  the ResUNet3D (end to end); their runs alternate so that load from elsewhere hits both alike.
- stitch: peak resident memory and time of stitching the whole volume's logits (the reference) against the
  package's slab-by-slab stitching, each in a fresh process, on a 256x256x200 volume with 118 classes from a 1x1x1
  stand-in network, so that stitching is what is measured; projected to 512x512x400 and to a 16 GiB machine.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..inference import sliding_window_logits
from ..metrics import class_metrics
from ..model import ResUNet3D
from ..optional import medpy_binary as medpy
from ..windows import gaussian_importance, outer, pad_to_patch, window_grid
from .common import compare, report, timeit

MEDPY_DISTANCES = ("asd", "assd", "hd95", "hd")  # medpy.metric.binary functions, imported on use


def organ_masks(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A liver-sized irregular reference and a prediction that misses its edges here and there plus a far-off island."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    wobble = ndimage.gaussian_filter(rng.standard_normal(shape), 8) * 40
    reference = (x / 0.5) ** 2 + (y / 0.4) ** 2 + (z / 0.45) ** 2 + wobble < 1
    edge_noise = ndimage.gaussian_filter(rng.standard_normal(shape), 3) * 5
    prediction = ((x - 0.02) / 0.49) ** 2 + (y / 0.41) ** 2 + (z / 0.45) ** 2 + wobble + edge_noise < 1
    prediction[10:16, 200:206, 170:178] = True
    return prediction, reference


def bench_metrics(repeat: int) -> tuple[list[list[Any]], dict[str, Any]]:
    shape, spacing = (256, 256, 200), (0.8, 0.8, 2.5)
    prediction, reference = organ_masks(shape)
    ours = class_metrics(prediction, reference, spacing)
    theirs = {name: float(getattr(medpy, name)(prediction, reference, spacing)) for name in MEDPY_DISTANCES}
    worst = max(abs(ours[f"{k}_mm"] - v) / abs(v) for k, v in theirs.items())
    ours_t = timeit(lambda: class_metrics(prediction, reference, spacing), repeat=repeat)
    medpy_t = timeit(
        lambda: [getattr(medpy, name)(prediction, reference, spacing) for name in MEDPY_DISTANCES], repeat=1, warmup=0
    )
    rows = [
        ["medpy, 4 calls (mm)", medpy_t["median_s"], medpy_t["cpu_median_s"], 1.0, 1.0, "-"],
        [
            "ours, 1 call (mm+vox)",
            ours_t["median_s"],
            ours_t["cpu_median_s"],
            medpy_t["median_s"] / ours_t["median_s"],
            medpy_t["cpu_median_s"] / ours_t["cpu_median_s"],
            f"{worst:.1e}",
        ],
    ]
    record = {
        "shape": shape,
        "spacing": spacing,
        "reference_voxels": int(reference.sum()),
        "prediction_voxels": int(prediction.sum()),
        "medpy": {**medpy_t, "values_mm": theirs},
        "ours": {**ours_t, "values": ours},
        "max_relative_difference": worst,
    }
    return rows, record


class Echo(nn.Module):
    """Returns its input as two-class logits: the cost left is the sliding window's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1)


@torch.no_grad()
def full_volume_logits(
    model: nn.Module, image: torch.Tensor, patch: tuple[int, int, int], num_classes: int, overlap: float, batch: int
) -> torch.Tensor:
    """The stitching the package had before streaming, kept as the reference: gaussian-weighted window logits added
    into one (num_classes, X, Y, Z) float32 array, divided by the weight sum at the end."""
    grid = window_grid(image.shape[1:], patch, overlap)
    image = torch.from_numpy(pad_to_patch(image.numpy(), patch, 0.0))
    weight = torch.from_numpy(gaussian_importance(tuple(patch)))
    logits = torch.zeros((num_classes, *grid.padded), dtype=torch.float32)
    for first in range(0, len(grid.corners), batch):
        chosen = grid.corners[first : first + batch]
        cut = torch.stack([image[:, x : x + patch[0], y : y + patch[1], z : z + patch[2]] for x, y, z in chosen])
        out = model(cut).float().contiguous().mul_(weight)
        for (x, y, z), window in zip(chosen, out):
            logits[:, x : x + patch[0], y : y + patch[1], z : z + patch[2]] += window
    logits /= outer(*(torch.from_numpy(total).float() for total in grid.divisors))
    return logits[:, : grid.shape[0], : grid.shape[1], : grid.shape[2]]


def bench_window(
    repeats: dict[str, int], shape: tuple[int, ...], patch: tuple[int, ...], overlap: float, batch: int
) -> tuple[list[list[Any]], dict[str, Any]]:
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        raise SystemExit("the window benchmark compares against MONAI: pip install -e '.[bench]'") from None
    torch.manual_seed(0)
    image = torch.randn(1, 1, *shape)
    rows, record = [], {"shape": shape, "patch": patch, "overlap": overlap, "batch": batch}
    for name, model in (("echo", Echo()), ("ResUNet3D", ResUNet3D(1, 2, (16, 32, 64, 128)).eval())):

        def ours(model: nn.Module = model) -> torch.Tensor:
            return sliding_window_logits(model, image[0], patch, 2, overlap=overlap, batch_size=batch)

        @torch.no_grad()
        def monai(model: nn.Module = model) -> torch.Tensor:
            return sliding_window_inference(
                image, patch, batch, model, overlap=overlap, mode="gaussian", sigma_scale=0.125
            )[0]

        agree = float((ours().argmax(0) == monai().argmax(0)).float().mean())
        times = compare({"monai": monai, "ours": ours}, repeat=repeats[name], warmup=0)  # the calls above warmed up
        monai_t, ours_t = times["monai"], times["ours"]
        rows.append([f"{name}: MONAI", monai_t["median_s"], monai_t["cpu_median_s"], 1.0, 1.0, "-"])
        rows.append(
            [
                f"{name}: ours",
                ours_t["median_s"],
                ours_t["cpu_median_s"],
                monai_t["median_s"] / ours_t["median_s"],
                monai_t["cpu_median_s"] / ours_t["cpu_median_s"],
                f"{agree:.4%}",
            ]
        )
        record[name] = {**times, "argmax_agreement": agree}
    return rows, record


STITCHERS = ("full volume", "streamed")  # full_volume_logits above, and the package's sliding_window_labels
GIB = 1024**3


def stitch_child(variant: str, shape: list[int], classes: int, patch: list[int], overlap: float, batch: int) -> None:
    """Runs in a fresh process: one stitching of a random volume with a 1x1x1 stand-in network, and prints its peak
    resident memory (before and after the volume exists) and seconds as JSON; the labels go to ``labels.npy``."""
    import json
    import resource

    from ..inference import sliding_window_labels

    def peak() -> int:  # bytes: ru_maxrss is in KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    torch.manual_seed(0)
    model, before = nn.Conv3d(1, classes, 1).eval(), peak()
    image = torch.randn(1, *shape)
    ready = peak()
    wall, cpu = time.perf_counter(), time.process_time()
    if variant == "full volume":
        logits = full_volume_logits(model, image, tuple(patch), classes, overlap, batch)
        labels = logits.argmax(0).to(torch.uint8).numpy()
    else:
        labels = sliding_window_labels(model, image, tuple(patch), classes, overlap=overlap, batch_size=batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    np.save("labels.npy", labels)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "start": before, "ready": ready, "peak": peak()}))


def stitch_runs(args: argparse.Namespace, folder: Path) -> dict[str, dict[str, Any]]:
    """Each stitcher in its own fresh Python process, so that its peak resident memory is its own."""
    import json
    import subprocess
    import sys

    package_root = str(Path(__file__).resolve().parents[2])  # this checkout's package, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    runs = {}
    for variant in STITCHERS:
        values = ", ".join(map(repr, (variant, args.stitch_shape, args.classes, args.patch, args.overlap, args.batch)))
        code = f"from unet3d_dist.bench.eval import stitch_child; stitch_child({values})"
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, check=True
        )
        runs[variant] = {**json.loads(out.stdout.splitlines()[-1]), "labels": np.load(folder / "labels.npy")}
    return runs


def projected_bytes(run: dict[str, Any], shape: list[int], target: list[int], streamed: bool) -> float:
    """Peak bytes at ``target`` from a run at ``shape``: the input (float32) grows with the volume; the stitching's
    own memory grows with the volume for the full-volume stitcher, with the y-z cross-section for the streamed one
    (its ring holds patch[0] planes), except for the label map (1 byte a voxel)."""
    voxels, grown = float(np.prod(shape)), float(np.prod(target))
    own = run["peak"] - run["ready"]
    if streamed:
        scaled = (own - voxels) * (target[1] * target[2]) / (shape[1] * shape[2]) + grown
    else:
        scaled = own * grown / voxels
    return run["start"] + 4 * grown + scaled


def largest_cube(run: dict[str, Any], shape: list[int], streamed: bool, budget: float = 16 * GIB) -> int:
    """The largest n (a multiple of 16) whose n x n x n volume's projected peak fits in ``budget``."""
    n = 16
    while projected_bytes(run, shape, [n + 16] * 3, streamed) <= budget:
        n += 16
    return n


def bench_stitch(args: argparse.Namespace) -> tuple[list[list[Any]], dict[str, Any]]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        runs = stitch_runs(args, Path(folder))
    agree = float((runs["streamed"].pop("labels") == runs["full volume"].pop("labels")).mean())
    big, rows = [512, 512, 400], []
    for variant, run in runs.items():
        streamed = variant == "streamed"
        run["projected_512x512x400_gib"] = projected_bytes(run, args.stitch_shape, big, streamed) / GIB
        run["largest_cube_in_16_gib"] = largest_cube(run, args.stitch_shape, streamed)
        rows.append(
            [
                variant,
                run["peak"] / 2**20,
                (run["peak"] - run["ready"]) / 2**20,
                run["wall_s"],
                run["cpu_s"],
                run["projected_512x512x400_gib"],
                f"{run['largest_cube_in_16_gib']}^3",
                "-" if not streamed else f"{agree:.6%}",
            ]
        )
    record = {"shape": args.stitch_shape, "classes": args.classes, "patch": args.patch, "overlap": args.overlap}
    return rows, {**record, "batch": args.batch, "runs": runs, "label_agreement": agree}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet3d_dist.bench eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["metrics", "window", "stitch", "all"], default="all")
    parser.add_argument("--classes", type=int, default=118, help="stitch: classes of the stand-in network")
    parser.add_argument("--stitch-shape", type=int, nargs=3, default=[256, 256, 200], help="stitch benchmark volume")
    parser.add_argument(
        "--repeat", type=int, default=10, help="timed runs of our metrics and of the echo windows (medpy runs once)"
    )
    parser.add_argument("--model-repeat", type=int, default=3, help="timed runs of the ResUNet3D windows")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 112, 96], help="window benchmark volume (x y z)")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 48], help="window benchmark patch (x y z)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2, help="windows per forward pass")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    columns = ["", "wall s", "CPU s", "speed-up wall", "speed-up CPU", "agreement"]
    if args.part in ("metrics", "all"):
        rows, record = bench_metrics(args.repeat)
        columns[-1] = "max rel diff"
        report(
            "metrics on 256x256x200, one organ",
            columns,
            rows,
            record,
            args.out and args.out.with_suffix(".metrics.json"),
        )
    if args.part in ("window", "all"):
        repeats = {"echo": args.repeat, "ResUNet3D": args.model_repeat}
        rows, record = bench_window(repeats, tuple(args.shape), tuple(args.patch), args.overlap, args.batch)
        columns[-1] = "argmax equal"
        title = (
            f"sliding window {'x'.join(map(str, args.shape))}, patch {'x'.join(map(str, args.patch))}, overlap "
            f"{args.overlap}"
        )
        report(title, columns, rows, record, args.out and args.out.with_suffix(".window.json"))
    if args.part in ("stitch", "all"):
        rows, record = bench_stitch(args)
        columns = ["", "peak MiB", "stitching MiB", "wall s", "CPU s", "512x512x400 GiB", "16 GiB fits", "labels equal"]
        size, patch = "x".join(map(str, args.stitch_shape)), "x".join(map(str, args.patch))
        title = f"stitching {size}, {args.classes} classes, patch {patch}, overlap {args.overlap}, 1x1x1 stand-in"
        report(title, columns, rows, record, args.out and args.out.with_suffix(".stitch.json"))
