"""Training-step speed: forward + backward + optimizer step, against this machine's conv3d peak.

The peak is one large 64->64 3x3x3 conv3d forward in the faster memory format, timed alternately with the steps
of each variant, so that the machine's changing speed (turbo, neighbours) hits both alike. Achieved FLOP rate =
FLOPs per step (counted by torch's FlopCounterMode over forward and backward) / step time. Variants: AMP off / bf16
/ fp16, channels_last_3d on / off, torch.compile on / off, and on the CPU glibc's default heap against the kept
heap that training uses (host_memory; glibc variants run first, since the setting is for the whole process).
MONAI's UNet (16-128, 2 residual units) and BasicUNet are measured the same way when MONAI is installed
(optional: pip install monai), after ours, with the last heap setting.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config
from ..host_memory import keep_freed_memory
from ..loss import DiceCELoss
from ..model import ResUNet3D, to_channels_last
from ..precision import amp_name, resolve_amp
from ..step import TrainStep
from .common import compare, report, timeit

AMP = ("off", "bf16", "fp16")


FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def reference_conv(
    device: torch.device, memory_format: str, amp: torch.dtype | None = None
) -> tuple[Callable[[], None], int]:
    """One 64->64 3x3x3 conv3d forward on 64x64x48 volumes (8 of them on a GPU), and its FLOPs; with ``amp``, the
    weights and the input are in that dtype already, so no cast is timed with the convolution."""
    fmt = FORMATS[memory_format]
    conv = nn.Conv3d(64, 64, 3, padding=1, bias=False).to(device, amp or torch.float32).to(memory_format=fmt)
    x = torch.randn(8 if device.type == "cuda" else 1, 64, 64, 64, 48, device=device, dtype=amp or torch.float32)
    x = x.contiguous(memory_format=fmt)

    def run() -> None:
        with torch.no_grad():
            conv(x)

    return run, 2 * 64 * 64 * 27 * x[:, 0].numel()


def conv3d_peak(device: torch.device, repeat: int, amp: torch.dtype | None = None) -> tuple[float, str]:
    """GFLOP/s of the reference conv in its faster memory format, and that format's name."""
    rates = {}
    for name in FORMATS:
        run, flops = reference_conv(device, name, amp)
        rates[name] = flops / timeit(run, repeat=repeat)["median_s"] / 1e9
    best = max(rates, key=rates.get)
    return rates[best], best


def make_step(
    model: nn.Module,
    batch: int,
    crop: tuple[int, int, int],
    amp: str,
    use_channels_last: bool,
    device: torch.device,
    net: nn.Module | None = None,
) -> Callable[[], None]:
    """A closure running the training's own step (TrainStep: loss, scaler, clipping, optimizer, schedule) on fixed
    in-memory tensors; ``net`` (default: the model) runs the forward pass, e.g. a compiled model."""
    cfg = Config()
    cfg.train.amp, cfg.train.channels_last = amp, "on" if use_channels_last else "off"
    step = TrainStep(model, cfg, device, total_steps=10**9)
    step.net = model if net is None else net  # not `net or model`: a compiled module has no truth value
    image = torch.randn(batch, 1, *crop, device=device)
    label = (image[:, 0] > 0.5).long()
    return lambda: step(image, label)


def step_flops(model: nn.Module, batch: int, crop: tuple[int, int, int], device: torch.device) -> int:
    """Forward + backward FLOPs of one step (counted once, in fp32, without compile)."""
    image = torch.randn(batch, 1, *crop, device=device)
    with FlopCounterMode(display=False) as counter:
        DiceCELoss()(model(image), (image[:, 0] > 0.5).long()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def monai_models() -> dict[str, Callable[[], nn.Module]]:
    try:
        from monai.networks.nets import BasicUNet, UNet
    except ImportError:
        return {}
    return {
        "MONAI UNet 16-128, 2 res units": lambda: UNet(3, 1, 2, (16, 32, 64, 128), (2, 2, 2), num_res_units=2),
        "MONAI BasicUNet": lambda: BasicUNet(3, 1, 2),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The step's size and the variants to measure."""
    parser = argparse.ArgumentParser(prog="python -m unet3d_dist.bench train_step", description=__doc__)
    parser.add_argument("--crop", type=int, nargs=3, default=[112, 112, 80], help="default: the product's crop")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--amp", nargs="+", choices=AMP, default=list(AMP), help="mixed-precision variants (default: all)"
    )
    parser.add_argument(
        "--channels-last", nargs="+", choices=["on", "off"], default=["on", "off"], help="memory-format variants"
    )
    parser.add_argument(
        "--compile", nargs="+", choices=["off", "on"], default=["off", "on"], help="torch.compile variants"
    )
    parser.add_argument(
        "--heap",
        nargs="+",
        choices=["glibc", "kept"],
        default=["kept"],
        help="CPU heap variants: glibc's default, and freed memory kept for reuse as in training (default: kept)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/train_step.json"))
    return parser.parse_args(argv)


@dataclass
class StepBench:
    """What every variant is measured with: the step's size, and the reference conv timed alternately with it."""

    device: torch.device
    batch: int
    crop: tuple[int, int, int]
    repeat: int
    peak_run: Callable[[], None]
    peak_flops: int

    def measure(self, name: str, heap: str, model: nn.Module, flops: int, amp: str, cl: bool, compiled: bool) -> dict:
        """One variant's result; its steps alternate with the reference conv, so a change in the machine's speed hits
        both alike."""
        model = model.to(self.device)
        if cl:
            to_channels_last(model)
        net = torch.compile(model) if compiled else model
        amp_used = amp_name(resolve_amp(amp, self.device))
        row = {"model": name, "heap": heap, "amp": amp_used, "channels_last": cl, "compile": compiled}
        try:
            # Warm-up also lets the kept heap settle: its free blocks coalesce over the first few steps.
            times = compare(
                {"step": make_step(model, self.batch, self.crop, amp, cl, self.device, net), "peak": self.peak_run},
                self.repeat,
                warmup=4 if compiled else 3,
            )
        except Exception as err:  # e.g. torch.compile without a working compiler: report, don't hide
            return {**row, "failed": type(err).__name__}
        seconds = times["step"]["median_s"]
        return {
            **row,
            "ms_per_step": seconds * 1e3,
            "voxels_per_s": self.batch * self.crop[0] * self.crop[1] * self.crop[2] / seconds,
            "gflop_per_step": flops / 1e9,
            "gflops": flops / seconds / 1e9,
            "peak_gflops": self.peak_flops / times["peak"]["median_s"] / 1e9,
        }


VARIANT = ["model", "heap", "amp", "channels_last", "compile"]
COLUMNS = [*VARIANT, "ms/step", "Mvoxel/s", "GFLOP/step", "GFLOP/s", "peak GFLOP/s", "of peak"]


def table_rows(measured: list[dict], peak: float | None) -> list[list]:
    """One row per variant; each result gains its fraction_of_peak, of the conv timed beside it, or for glibc rows of
    the machine's ``peak``."""
    rows = []
    for r in measured:
        variant = [r[key] for key in VARIANT]
        if "failed" in r:
            rows.append([*variant, f"failed: {r['failed']}", "", "", "", "", ""])
            continue
        compared_with = r["peak_gflops"] if r["heap"] != "glibc" or peak is None else peak
        r["fraction_of_peak"] = r["gflops"] / compared_with
        rows.append(
            [
                *variant,
                r["ms_per_step"],
                r["voxels_per_s"] / 1e6,
                r["gflop_per_step"],
                r["gflops"],
                compared_with,
                r["fraction_of_peak"],
            ]
        )
    return rows


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    crop = tuple(args.crop)
    heaps = [heap for heap in ("glibc", "kept") if heap in args.heap] if device.type == "cpu" else ["n/a"]
    variants = [
        (amp, cl == "on", compiled == "on")
        for amp in args.amp
        for cl in args.channels_last
        for compiled in args.compile
    ]
    flops_ours = step_flops(ResUNet3D().to(device), args.batch, crop, device)
    _, peak_format = conv3d_peak(device, 1)
    bench = StepBench(device, args.batch, crop, args.repeat, *reference_conv(device, peak_format))
    measured = []
    for heap in heaps:
        if heap == "kept" and not keep_freed_memory():
            raise SystemExit("--heap kept needs glibc (Linux); use --heap glibc")
        for amp, cl, compiled in variants:
            torch.manual_seed(0)
            measured.append(bench.measure("ResUNet3D 16-128 (ours)", heap, ResUNet3D(), flops_ours, amp, cl, compiled))
    for name, factory in monai_models().items():
        torch.manual_seed(0)
        model = factory()  # built right after the seed, before the copy whose FLOPs are counted
        flops = step_flops(factory().to(device), args.batch, crop, device)
        measured.append(bench.measure(name, heaps[-1], model, flops, "auto", True, False))
    # Under glibc's heap the reference conv faults its 48 MB output in on every call too; the machine's peak is the
    # one measured with the kept heap, so glibc rows are compared with that.
    kept_peaks = [r["peak_gflops"] for r in measured if "peak_gflops" in r and r["heap"] != "glibc"]
    peak = statistics.median(kept_peaks) if kept_peaks else None
    record = {"crop": crop, "batch": args.batch, "peak_format": peak_format, "peak_gflops": peak, "results": measured}
    title = (
        f"Training step, crop {'x'.join(map(str, crop))}, batch {args.batch}, {device.type}; "
        f"against a 64->64 conv3d ({peak_format}) timed alternately with each step"
    )
    report(title, COLUMNS, table_rows(measured, peak), record, args.out)
