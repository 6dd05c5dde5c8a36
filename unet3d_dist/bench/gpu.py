"""GPU check (one GPU, under 5 minutes): ``launch/gpu_check.sh`` or ``python -m unet3d_dist.bench gpu``.

1. training throughput at the default 112x112x80 crop, batch 2: bf16 and fp16, torch.compile off and on, with the
   peak GPU memory of each, against the conv3d peak measured in the same run;
2. one whole-volume evaluation (256x256x160 CT-sized volume): sliding window in bf16, then the medpy-exact metrics;
3. a 1-process torchrun with the NCCL backend (process group, all-reduce of the gradient volume).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as c10d

from ..dist import runtime, torchrun_command
from ..inference import predict_labels, sliding_window_logits
from ..metrics import case_metrics
from ..model import ResUNet3D, count_parameters, to_channels_last
from .common import report, timeit
from .train_step import conv3d_peak, make_step, step_flops


def throughput(crop: tuple[int, int, int], batch: int, repeat: int, peak: float) -> list[list]:
    device = torch.device("cuda")
    flops = step_flops(ResUNet3D().to(device), batch, crop, device)
    rows = []
    for amp in ("bf16", "fp16"):
        for compiled in (False, True):
            torch.manual_seed(0)
            model = to_channels_last(ResUNet3D().to(device))
            net = torch.compile(model) if compiled else model
            torch.cuda.reset_peak_memory_stats()
            seconds = timeit(
                make_step(model, batch, crop, amp, True, device, net), repeat=repeat, warmup=3 if compiled else 2
            )["median_s"]
            rate = flops / seconds / 1e12
            rows.append(
                [
                    f"train step {amp}{' compiled' if compiled else ''}",
                    seconds * 1e3,
                    batch * np.prod(crop) / seconds / 1e6,
                    rate,
                    rate * 1e3 / peak,
                    torch.cuda.max_memory_allocated() / 2**30,
                ]
            )
    return rows


def one_volume(crop: tuple[int, int, int]) -> list[list]:
    device = torch.device("cuda")
    model = to_channels_last(ResUNet3D().to(device)).eval()
    shape = (256, 256, 160)
    image = torch.randn(1, *shape)
    start = time.perf_counter()
    labels = predict_labels(
        sliding_window_logits(
            model, image, crop, 2, batch_size=4, amp_dtype=torch.bfloat16, device=device, channels_last=True
        )
    )
    torch.cuda.synchronize()
    window = time.perf_counter() - start
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    reference = (np.linalg.norm((grid - np.array([128, 120, 80])) / [60, 50, 40], axis=-1) < 1).astype(np.uint8)
    start = time.perf_counter()
    case_metrics(np.maximum(labels, reference[::-1].copy()), reference, (0.8, 0.8, 2.0), ["background", "organ"], True)
    metrics = time.perf_counter() - start
    return [
        ["evaluate 256x256x160: sliding window (bf16)", window * 1e3, "", "", "", ""],
        ["evaluate 256x256x160: metrics", metrics * 1e3, "", "", "", ""],
    ]


def nccl_worker(out: Path) -> None:
    with runtime("cuda", 60, require_group=True) as env:
        grads = torch.ones(count_parameters(ResUNet3D()), device=env.device)
        seconds = timeit(lambda: c10d.all_reduce(grads), repeat=20, warmup=3)["median_s"]
        out.write_text(
            json.dumps(
                {
                    "backend": c10d.get_backend(),
                    "world_size": env.world_size,
                    "allreduce_s": seconds,
                    "ok": bool(grads[0] == 1),
                }
            )
        )


def nccl_check() -> list[list]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nccl.json"
        command = [*torchrun_command(1), "-m", "unet3d_dist.bench", "gpu", "--nccl-worker", str(out)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "4"})
        result = json.loads(out.read_text())
    return [
        [
            f"torchrun 1 process, {result['backend']} all-reduce of the gradients "
            f"({'ok' if result['ok'] else 'WRONG'})",
            result["allreduce_s"] * 1e3,
            "",
            "",
            "",
            "",
        ]
    ]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet3d_dist.bench gpu", description=__doc__)
    parser.add_argument("--crop", type=int, nargs=3, default=[112, 112, 80])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu.json"))
    parser.add_argument("--nccl-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_worker:
        nccl_worker(args.nccl_worker)
        return
    if not torch.cuda.is_available():
        sys.exit("error: the GPU check needs a CUDA GPU, and none is visible")
    crop = tuple(args.crop)
    peak, _ = conv3d_peak(torch.device("cuda"), args.repeat, torch.bfloat16)
    rows = throughput(crop, args.batch, args.repeat, peak) + one_volume(crop) + nccl_check()
    columns = ["check", "ms", "Mvoxel/s", "TFLOP/s", "of conv3d peak", "peak GiB"]
    title = (
        f"GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 conv3d peak {peak / 1e3:.1f} "
        "TFLOP/s"
    )
    report(
        title, columns, rows, {"crop": crop, "batch": args.batch, "conv3d_peak_gflops": peak, "rows": rows}, args.out
    )
