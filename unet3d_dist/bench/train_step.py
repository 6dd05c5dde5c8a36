"""Training-step speed: forward + backward + optimizer step, against this machine's conv3d peak.

The peak is one large 64->64 3x3x3 conv3d forward, measured in the same run in both memory formats (the faster
counts). Achieved FLOP rate = FLOPs per step (counted by torch's FlopCounterMode over forward and backward) / step
time. Variants: AMP off / bf16 / fp16, channels_last_3d on / off, torch.compile on / off, and on the CPU glibc's
default heap against the kept heap that training uses (host_memory; the glibc variants run first, since the
setting is for the whole process). MONAI's UNet (16-128, 2 residual units) and BasicUNet are measured the same way
when MONAI is installed (optional: pip install monai), after ours, with the last heap setting.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..loss import DiceCELoss
from ..host_memory import keep_freed_memory
from ..model import ResUNet3D, as_channels_last, to_channels_last
from ..train import build_optimizer
from ..config import OptimConfig
from .common import report, timeit


AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def conv3d_peak(device: torch.device, repeat: int, amp: torch.dtype | None = None) -> tuple[float, str]:
    """GFLOP/s of a 64->64 3x3x3 conv3d forward on 64x64x48 volumes (8 of them on a GPU), best memory format."""
    best, best_format = 0.0, ""
    batch = 8 if device.type == "cuda" else 1
    for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d)):
        conv = nn.Conv3d(64, 64, 3, padding=1, bias=False).to(device).to(memory_format=fmt)
        x = torch.randn(batch, 64, 64, 64, 48, device=device).contiguous(memory_format=fmt)
        flops = 2 * 64 * 64 * 27 * x[:, 0].numel()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            seconds = timeit(lambda: conv(x), repeat=repeat)["median_s"]
        if flops / seconds / 1e9 > best:
            best, best_format = flops / seconds / 1e9, name
    return best, best_format


def make_step(model: nn.Module, batch: int, crop: tuple[int, int, int], amp: torch.dtype | None, use_channels_last: bool, device: torch.device) -> Callable[[], None]:
    """A closure running one real training step (our loss and optimizer) on fixed in-memory tensors."""
    image = torch.randn(batch, 1, *crop, device=device)
    if use_channels_last:
        image = as_channels_last(image)
    label = (image[:, 0] > 0.5).long()
    optimizer = build_optimizer(list(model.parameters()), OptimConfig())
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    loss_fn = DiceCELoss()

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(image)
        loss = loss_fn(out, label)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def step_flops(model: nn.Module, batch: int, crop: tuple[int, int, int], device: torch.device) -> int:
    """Forward + backward FLOPs of one step (counted once, in fp32, without compile)."""
    image = torch.randn(batch, 1, *crop, device=device)
    with FlopCounterMode(display=False) as counter:
        DiceCELoss()(model(image), (image[:, 0] > 0.5).long()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def monai_models() -> dict[str, Callable[[], nn.Module]]:
    try:
        from monai.networks.nets import UNet, BasicUNet
    except ImportError:
        return {}
    return {
        "MONAI UNet 16-128, 2 res units": lambda: UNet(3, 1, 2, (16, 32, 64, 128), (2, 2, 2), num_res_units=2),
        "MONAI BasicUNet": lambda: BasicUNet(3, 1, 2),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet3d_dist.bench train_step", description=__doc__)
    parser.add_argument("--crop", type=int, nargs=3, default=[112, 112, 80], help="default: the product's crop")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--amp", nargs="+", choices=list(AMP), default=list(AMP), help="mixed-precision variants (default: all)")
    parser.add_argument("--channels-last", nargs="+", choices=["on", "off"], default=["on", "off"], help="memory-format variants")
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"], help="torch.compile variants")
    parser.add_argument("--heap", nargs="+", choices=["glibc", "kept"], default=["kept"],
                        help="CPU heap variants: glibc's default, and freed memory kept for reuse as in training (default: kept)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/train_step.json"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    crop = tuple(args.crop)
    heaps = [heap for heap in ("glibc", "kept") if heap in args.heap] if device.type == "cpu" else ["n/a"]
    default_amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else None
    variants = [(AMP[amp], cl == "on", compiled == "on") for amp in args.amp for cl in args.channels_last for compiled in args.compile]
    flops_ours = step_flops(ResUNet3D().to(device), args.batch, crop, device)
    measured: list[tuple[str, str, torch.dtype | None, bool, bool, int, float | str]] = []

    def measure(name: str, heap: str, model: nn.Module, flops: int, amp: torch.dtype | None, cl: bool, compiled: bool) -> None:
        model = model.to(device)
        if cl:
            to_channels_last(model)
        net = torch.compile(model) if compiled else model
        try:
            seconds: float | str = timeit(make_step(net, args.batch, crop, amp, cl, device), repeat=args.repeat, warmup=2 if compiled else 1)["median_s"]
        except Exception as err:  # e.g. torch.compile without a working compiler: report, don't hide
            seconds = f"failed: {type(err).__name__}"
        measured.append((name, heap, amp, cl, compiled, flops, seconds))

    for heap in heaps:
        if heap == "kept" and not keep_freed_memory():
            raise SystemExit("--heap kept needs glibc (Linux); use --heap glibc")
        for amp, cl, compiled in variants:
            torch.manual_seed(0)
            measure("ResUNet3D 16-128 (ours)", heap, ResUNet3D(), flops_ours, amp, cl, compiled)
    for name, factory in monai_models().items():
        torch.manual_seed(0)
        measure(name, heaps[-1], factory(), step_flops(factory().to(device), args.batch, crop, device), default_amp, True, False)
    peak, peak_format = conv3d_peak(device, args.repeat)  # last, with the heap setting that suits it best
    rows, record = [], {"crop": crop, "batch": args.batch, "peak_gflops": peak, "peak_format": peak_format, "results": []}
    for name, heap, amp, cl, compiled, flops, seconds in measured:
        amp_name = str(amp).replace("torch.", "") if amp else "off"
        if isinstance(seconds, str):
            rows.append([name, heap, amp_name, cl, compiled, seconds, "", "", "", ""])
            continue
        rate = flops / seconds / 1e9
        voxels = args.batch * crop[0] * crop[1] * crop[2] / seconds
        rows.append([name, heap, amp_name, cl, compiled, seconds * 1e3, voxels / 1e6, flops / 1e9, rate, rate / peak])
        record["results"].append(
            {"model": name, "heap": heap, "amp": amp_name, "channels_last": cl, "compile": compiled, "ms_per_step": seconds * 1e3,
             "voxels_per_s": voxels, "gflop_per_step": flops / 1e9, "gflops": rate, "fraction_of_peak": rate / peak}
        )
    title = (
        f"Training step, crop {'x'.join(map(str, crop))}, batch {args.batch}, {device.type}; "
        f"conv3d peak {peak:.1f} GFLOP/s ({peak_format})"
    )
    columns = ["model", "heap", "amp", "channels_last", "compile", "ms/step", "Mvoxel/s", "GFLOP/step", "GFLOP/s", "of peak"]
    report(title, columns, rows, record, args.out)
