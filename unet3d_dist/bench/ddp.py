"""DDP cost: step time of 1 rank against 2 ranks at equal per-rank work, and the gradient all-reduce alone.

``python -m unet3d_dist.bench ddp`` launches itself three times under torchrun, ``--threads`` per process (1): 1 rank;
2 ranks stepping independently (no DDP: the reference for what two processes on one machine cost each other in
memory bandwidth and cache); 2 ranks under DDP. DDP's own cost is the third against the second. The all-reduce is
timed on a flat tensor of the model's gradient size, which is what DDP's buckets carry per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.distributed as c10d

from ..config import Config
from ..dist import runtime, torchrun_command
from ..model import ResUNet3D, count_parameters, to_channels_last
from ..step import TrainStep
from .common import report, timeit


def worker(args: argparse.Namespace) -> None:
    """Runs inside torchrun: time DDP steps and the all-reduce, rank 0 writes JSON."""
    with runtime("auto", 120) as env:
        torch.manual_seed(0)
        model = to_channels_last(ResUNet3D().to(env.device))
        use_ddp = env.multi_rank and not args.independent
        step = TrainStep(model, Config(), env.device, total_steps=10**9)  # the training's own step
        if use_ddp:
            step.net = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        image = torch.randn(args.batch, 1, *args.crop, device=env.device)
        label = (image[:, 0] > 1).long()
        step_time = timeit(lambda: step(image, label), repeat=args.steps)
        result = {"world_size": env.world_size, "step": step_time, "threads": torch.get_num_threads()}
        if use_ddp:
            grads = torch.zeros(count_parameters(model), device=env.device)
            result["allreduce"] = timeit(lambda: c10d.all_reduce(grads), repeat=20, warmup=3)
            result["allreduce_bytes"] = grads.numel() * grads.element_size()
        if env.is_main:
            Path(args.worker).write_text(json.dumps(result))


def launch(nproc: int, args: argparse.Namespace, out: Path, independent: bool = False) -> dict:
    command = [
        *torchrun_command(nproc),
        "-m",
        "unet3d_dist.bench",
        "ddp",
        "--worker",
        str(out),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--crop",
        *map(str, args.crop),
        *(["--independent"] if independent else []),
    ]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return json.loads(out.read_text())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet3d_dist.bench ddp", description=__doc__)
    parser.add_argument("--crop", type=int, nargs=3, default=[64, 64, 48])
    parser.add_argument("--batch", type=int, default=2, help="crops per rank")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="threads per process (oneDNN picks other kernels with more than one)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/ddp.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--independent", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        one = launch(1, args, Path(tmp) / "one.json")
        apart = launch(2, args, Path(tmp) / "apart.json", independent=True)
        two = launch(2, args, Path(tmp) / "two.json")
    t1, t_apart, t2 = one["step"]["median_s"], apart["step"]["median_s"], two["step"]["median_s"]
    ar = two["allreduce"]["median_s"]
    rows = [
        ["step, 1 rank", t1 * 1e3, 1.0, ""],
        ["step, 2 independent processes (no DDP)", t_apart * 1e3, t1 / t_apart, 1.0],
        ["step, 2 ranks (DDP, gloo)", t2 * 1e3, t1 / t2, t_apart / t2],
        ["all-reduce of the gradients alone", ar * 1e3, ar / t1, ar / t_apart],
    ]
    record = {
        "crop": args.crop,
        "batch_per_rank": args.batch,
        "one_rank": one,
        "two_independent": apart,
        "two_ranks": two,
        "scaling_efficiency": t1 / t2,
        "ddp_efficiency": t_apart / t2,
        "allreduce_mb": two["allreduce_bytes"] / 1e6,
        "allreduce_gb_per_s": two["allreduce_bytes"] / ar / 1e9,
    }
    title = (
        f"DDP on {one['threads']} thread(s) per rank, crop {'x'.join(map(str, args.crop))}, batch {args.batch}/rank, "
        f"gradients {record['allreduce_mb']:.2f} MB"
    )
    report(title, ["measurement", "ms", "ratio to 1-rank step", "ratio to independent"], rows, record, args.out)
