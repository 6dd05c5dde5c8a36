"""GPU check (one GPU, under 5 minutes): ``launch/gpu_check.sh`` or ``python -m unet3d_dist.bench gpu``.

1. training throughput at the default 112x112x80 crop, batch 2: bf16 and fp16, channels_last on and off (and
   torch.compile with ``--compile``), with the peak GPU memory of each, against a conv3d peak measured in the same
   run in the same dtype, inputs included;
2. the loader: one worker's crops per second at the GPU recipe's augmentation (configs/la_mri.yaml), on both
   augmentation paths, and the workers this GPU needs at the measured bf16 step time;
3. one whole-volume evaluation (256x256x160 CT-sized volume): sliding window in bf16, then the medpy-exact metrics;
4. a 1-process torchrun with the NCCL backend (process group, the gloo side group, all-reduce of the gradients);
5. checks of what only CUDA shows: native bf16 and what ``train.amp=auto`` picks, a non-finite bf16 step skipped,
   this GPU's RNG state saved and restored as checkpoints do.

Every row runs in its own try: a failure (no compiler for torch.compile, say) is a row that says why, and the JSON
is written all the same. A check that finds a wrong result says WRONG and the command exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as c10d

from ..checkpoint import rng_state, set_rng_state
from ..config import Config
from ..data.synthetic import ensure_synthetic
from ..dist import any_rank, runtime, torchrun_command
from ..inference import predict_labels, sliding_window_logits
from ..metrics import case_metrics
from ..model import ResUNet3D, count_parameters, to_channels_last
from ..precision import AMP_DTYPES, amp_name, native_bf16, resolve_amp
from ..step import TrainStep
from . import loader
from .common import report, timeit
from .train_step import conv3d_peak, make_step, step_flops

COLUMNS = ["check", "ms", "Mvoxel/s", "TFLOP/s", "of conv3d peak", "peak GiB"]


def row(name: str, ms: float | str = "", *rest: object) -> list:
    return [name, ms, *rest, *[""] * (len(COLUMNS) - 2 - len(rest))]


def attempt(name: str, rows: list[list], measure: Callable[[], list[list]]) -> None:
    """Append the rows ``measure`` gives, or one row saying why it failed."""
    try:
        rows.extend(measure())
    except Exception as err:  # a missing compiler, an out-of-memory: report it and go on
        rows.append(row(f"{name}: failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})"))


def throughput(crop: tuple[int, int, int], batch: int, repeat: int, amp: str, cl: bool, compiled: bool, peak: float):
    device = torch.device("cuda")
    flops = step_flops(ResUNet3D().to(device), batch, crop, device)
    torch.manual_seed(0)
    model = ResUNet3D().to(device)
    if cl:
        to_channels_last(model)
    net = torch.compile(model) if compiled else model
    torch.cuda.reset_peak_memory_stats()
    seconds = timeit(make_step(model, batch, crop, amp, cl, device, net), repeat=repeat, warmup=3 if compiled else 2)
    seconds = seconds["median_s"]
    rate = flops / seconds / 1e12
    name = f"train step {amp}, channels_last {'on' if cl else 'off'}{', compiled' if compiled else ''}"
    memory = torch.cuda.max_memory_allocated() / 2**30
    return [row(name, seconds * 1e3, batch * np.prod(crop) / seconds / 1e6, rate, rate * 1e3 / peak, memory)]


def loader_rows(step_ms: float, batch: int) -> list[list]:
    record = loader.measure(
        Path("configs/la_mri.yaml"),
        ensure_synthetic("~/.cache/unet3d_dist/synthetic", 24),
        24,
        batch,
        step_ms,
        torch.device("cuda"),
    )
    rows = [
        row(f"loader, one worker: {name} ({rate:.1f} crops/s; {record['workers_needed'][name]} workers per GPU)")
        for name, rate in record["crops_per_worker_per_s"].items()
    ]
    return rows + [row("loader: the device's share of finishing a crop", record["device_ms_per_crop"])]


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
        row("evaluate 256x256x160: sliding window (bf16)", window * 1e3),
        row("evaluate 256x256x160: metrics", metrics * 1e3),
    ]


def nccl_worker(out: Path) -> None:
    with runtime("cuda", 60, require_group=True) as env:
        grads = torch.ones(count_parameters(ResUNet3D()), device=env.device)
        seconds = timeit(lambda: c10d.all_reduce(grads), repeat=20, warmup=3)["median_s"]
        agreed = any_rank(True)  # through the gloo side group made at start-up
        out.write_text(
            json.dumps({"backend": c10d.get_backend(), "allreduce_s": seconds, "ok": bool(grads[0] == 1) and agreed})
        )


def nccl_check() -> list[list]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nccl.json"
        command = [*torchrun_command(1), "-m", "unet3d_dist.bench", "gpu", "--nccl-worker", str(out)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "4"})
        result = json.loads(out.read_text())
    verdict = "ok" if result["ok"] else "WRONG"
    return [
        row(
            f"torchrun 1 process, {result['backend']} all-reduce and the gloo side group ({verdict})",
            result["allreduce_s"] * 1e3,
        )
    ]


def cuda_only_checks() -> list[list]:
    device = torch.device("cuda")
    capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
    hardware = "yes" if native_bf16(device) else "no"
    picked = amp_name(resolve_amp("auto", device))
    rows = [row(f"bf16 in hardware: {hardware} (compute capability {capability}); train.amp=auto picks {picked}")]
    cfg = Config()
    cfg.train.amp = "bf16"
    model = ResUNet3D(1, 2, (8, 8, 16, 16)).to(device)
    step = TrainStep(model, cfg, device, total_steps=10)
    before = [p.detach().clone() for p in model.parameters()]
    image = torch.randn(2, 1, 32, 32, 32, device=device)
    image[0, 0, 0, 0, 0] = float("nan")
    step(image, (image[:, 0] > 0).long())
    skipped = all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and int(step.nonfinite_run) == 1
    rows.append(row(f"a non-finite bf16 step is skipped, the weights untouched ({'ok' if skipped else 'WRONG'})"))
    state = rng_state(device)
    expected = torch.rand(4, device=device)
    set_rng_state(state, device)
    restored = torch.equal(torch.rand(4, device=device), expected)
    rows.append(row(f"this GPU's RNG state restores from a checkpoint's ({'ok' if restored else 'WRONG'})"))
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet3d_dist.bench gpu", description=__doc__)
    parser.add_argument("--crop", type=int, nargs=3, default=[112, 112, 80])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (two cold compiles: minutes)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu.json"))
    parser.add_argument("--nccl-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_worker:
        nccl_worker(args.nccl_worker)
        return
    if not torch.cuda.is_available():
        sys.exit("error: the GPU check needs a CUDA GPU, and none is visible")
    torch.backends.cudnn.benchmark = True  # as every command on a GPU runs (dist.runtime)
    device, crop = torch.device("cuda"), tuple(args.crop)
    peaks = {amp: conv3d_peak(device, args.repeat, AMP_DTYPES[amp])[0] for amp in ("bf16", "fp16")}
    rows: list[list] = []
    for amp in ("bf16", "fp16"):
        for cl in (True, False):
            for compiled in (False, True) if args.compile else (False,):
                name = f"train step {amp}, channels_last {cl}, compile {compiled}"
                attempt(name, rows, lambda: throughput(crop, args.batch, args.repeat, amp, cl, compiled, peaks[amp]))  # noqa: B023
    bf16 = [r[1] for r in rows if isinstance(r[1], float) and r[0].startswith("train step bf16")]
    attempt("loader", rows, lambda: loader_rows(min(bf16) if bf16 else 15.0, args.batch))
    attempt("evaluate one volume", rows, lambda: one_volume(crop))
    attempt("torchrun with NCCL", rows, nccl_check)
    attempt("CUDA-only checks", rows, cuda_only_checks)
    title = (
        f"GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}, conv3d peak "
        f"bf16 {peaks['bf16'] / 1e3:.1f} / fp16 {peaks['fp16'] / 1e3:.1f} TFLOP/s (inputs in that dtype)"
    )
    record = {"crop": crop, "batch": args.batch, "conv3d_peak_gflops": peaks, "rows": rows}
    report(title, COLUMNS, rows, record, args.out)
    if any("WRONG" in str(r[0]) for r in rows):
        sys.exit(1)
