"""The device check: ``launch/gpu_check.sh --out DIR`` (``PYTHONPATH=. python3 -m unet3d_dist.bench gpu``).

Made for a short lease on a bare GPU machine: it needs only torch, numpy, scipy, h5py, rich and pyyaml (no
SimpleITK, medpy or wandb; nothing to install), runs in under 5 minutes on one GPU, and writes each row to
``DIR/gpu.jsonl`` and ``DIR/gpu.md`` as soon as it is measured, so a timeout keeps every row before it. Rows run
in priority order; ``--only GROUP ...`` reruns some. Without a GPU it rehearses on the CPU (``--tiny`` for small
sizes): every row runs, the CUDA-only parts through their CPU counterparts.

groups, in order:
  peak        conv3d peak in bf16, fp16 and fp32 (one 64->64 3x3x3 conv, inputs in that dtype)
  step        our training step at the crop (112x112x80, batch 2) in bf16: channels_last on/off, eager; ms,
              TFLOP/s, share of the datasheet's dense bf16 peak and of the measured conv3d peak, peak memory
  sync        5 training steps of the real Trainer with device augmentation: no host synchronisation
  layout      what train.channels_last=auto picks, and the layout copies a GroupNorm block makes in channels_last
  compiled    the step rows compiled (train.compile_backend, inductor by default)
  data        crops/s of the loader workers and of the device-resident path against what the fastest step needs
  quickstart  the quickstart's training (300 steps, seed 0) on this device, ending with its validation Dice
  evaluate    sliding-window inference of a CT-sized volume: volumes/s and Mvoxel/s, then the metrics
  checks      bf16 in hardware and what amp=auto picks, a non-finite step skipped, the RNG state restored
  nccl        a 1-process torchrun (NCCL on a GPU, gloo on the CPU): the gradient all-reduce and the side group
A check that finds a wrong result says WRONG and the command exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as c10d

from ..checkpoint import rng_state, set_rng_state
from ..config import Config, load_config
from ..data.synthetic import ensure_synthetic
from ..dist import any_rank, runtime, synchronize, torchrun_command
from ..inference import sliding_window_labels
from ..layout import choose_channels_last
from ..metrics import case_metrics
from ..model import ResBlock, ResUNet3D, as_channels_last, count_parameters, to_channels_last
from ..precision import AMP_DTYPES, amp_name, fast_cpu_bf16, native_bf16, resolve_amp
from ..step import TrainStep
from . import loader
from .common import machine, timeit
from .record import RowRecorder
from .train_step import conv3d_peak, make_step, step_flops

GROUPS = ("peak", "step", "sync", "layout", "compiled", "data", "quickstart", "evaluate", "checks", "nccl")
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


@dataclass(frozen=True)
class Sizes:
    """What the check measures at: the product's sizes on a GPU, small ones for a CPU rehearsal."""

    crop: tuple[int, int, int] = (112, 112, 80)
    batch: int = 2
    repeat: int = 10
    widths: tuple[int, ...] = (16, 32, 64, 128)
    volume: tuple[int, int, int] = (256, 256, 160)
    quickstart: tuple[str, ...] = ()  # overrides of the default config: none, the quickstart itself
    phantom_cases: int = 24
    data_crops: int = 40
    compile_backend: str = "inductor"


TINY = Sizes(
    crop=(48, 48, 32),
    repeat=2,
    widths=(8, 16, 32, 64),
    volume=(64, 64, 48),
    quickstart=(  # configs/debug.yaml's sizes, 20 steps, fp32 (bf16 on the CPU is slow at these widths)
        "data.synthetic_cases=6",
        "data.crop=[48,48,32]",
        "data.samples_per_epoch=20",
        "train.epochs=2",
        "train.amp=off",
        "model.widths=[8,16,32,64]",
    ),
    phantom_cases=6,
    data_crops=6,
    compile_backend="aot_eager",
)


def datasheet_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak the GPU's datasheet gives (SXM parts), if this GPU is in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(
        (peak for key, peak in sorted(DATASHEET_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if key in name), None
    )


class DeviceCheck:
    """The groups of rows, each a generator of row dicts; shared results (peaks, step times) flow between them."""

    def __init__(self, device: torch.device, sizes: Sizes, out: Path):
        self.device, self.sizes, self.out = device, sizes, out
        self.conv_peak: dict[str, float] = {}
        self.step_ms: dict[str, float] = {}
        self.datasheet = datasheet_tflops(device)

    def peak(self) -> Iterator[dict]:
        for amp in ("bf16", "fp16", "off"):
            gflops, layout = conv3d_peak(self.device, self.sizes.repeat, AMP_DTYPES.get(amp))
            self.conv_peak[amp] = gflops / 1e3
            yield {"row": f"conv3d peak {amp_label(amp)}", "tflops": gflops / 1e3, "result": layout}

    def step_row(self, channels_last: bool, compiled: bool) -> dict:
        sizes, device = self.sizes, self.device
        flops = step_flops(ResUNet3D(widths=sizes.widths).to(device), sizes.batch, sizes.crop, device)
        torch.manual_seed(0)
        model = ResUNet3D(widths=sizes.widths).to(device)
        if channels_last:
            to_channels_last(model)
        net = torch.compile(model, backend=sizes.compile_backend) if compiled else model
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run = make_step(model, sizes.batch, sizes.crop, "bf16", channels_last, device, net)
        seconds = timeit(run, repeat=sizes.repeat, warmup=3 if compiled else 2)["median_s"]
        name = f"step bf16 {'channels_last' if channels_last else 'contiguous'} {'compiled' if compiled else 'eager'}"
        self.step_ms[name] = seconds * 1e3
        tflops = flops / seconds / 1e12
        return {
            "row": name,
            "ms": seconds * 1e3,
            "tflops": tflops,
            "mfu_datasheet": tflops / self.datasheet if self.datasheet else None,
            "mfu_conv": tflops / self.conv_peak["bf16"] if "bf16" in self.conv_peak else None,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "result": f"{flops / 1e9:.0f} GFLOP per step, {'x'.join(map(str, sizes.crop))} x {sizes.batch}",
        }

    def step(self) -> Iterator[dict]:
        for channels_last in (True, False):
            yield self.step_row(channels_last, compiled=False)

    def compiled(self) -> Iterator[dict]:
        for channels_last in (True, False):
            yield self.step_row(channels_last, compiled=True)

    def sync(self) -> Iterator[dict]:
        from .host_sync import host_reads_in_steps

        for resident in ("off", "on"):
            overrides = ("data.augment_device=device", f"data.resident={resident}", "train.compile=off")
            with self.trainer(f"sync-resident-{resident}", *overrides) as trainer:
                reads = host_reads_in_steps(trainer, steps=5)
            path = "device-resident data" if resident == "on" else "loader workers + device augmentation"
            verdict = "ok: none" if not reads else f"WRONG: {len(reads)} ({reads[0]})"
            yield {"row": f"host syncs in 5 training steps, {path}", "result": verdict}

    def layout(self) -> Iterator[dict]:
        amp = resolve_amp("bf16", self.device)
        on, why = choose_channels_last("auto", self.device, self.sizes.widths[0], "group", amp)
        yield {"row": "train.channels_last=auto picks", "result": f"{'on' if on else 'off'} ({why})"}
        yield groupnorm_copies(self.device, self.sizes.widths[0])

    def data(self) -> Iterator[dict]:
        best = min(self.step_ms.items(), key=lambda kv: kv[1], default=("a 15 ms step (none measured)", 15.0))
        needed = self.sizes.batch / (best[1] / 1e3)
        yield {"row": "data: crops/s the fastest step needs", "rate": needed, "result": f"{best[0]}, {best[1]:.2f} ms"}
        dataset = ensure_synthetic("~/.cache/unet3d_dist/synthetic", self.sizes.phantom_cases, 2)
        recipe, crops = Path("configs/la_mri.yaml"), self.sizes.data_crops
        overrides = [f"data.crop=[{','.join(map(str, self.sizes.crop))}]"]
        record = loader.measure(recipe, dataset, crops, self.sizes.batch, best[1], self.device, overrides)
        per_worker = record["crops_per_worker_per_s"]["augmented, the workers' share (device)"]
        workers = max(1, (os.cpu_count() or 2) - 1)
        yield {
            "row": "data: loader workers (la_mri augmentation, finished on the device)",
            "rate": per_worker * workers,
            "result": f"{workers} workers x {per_worker:.1f} crops/s (an upper bound); "
            f"{per_worker * workers / needed:.2f}x what the step needs",
        }
        resident = loader.resident_crops_per_s(recipe, dataset, crops, self.sizes.batch, self.device, overrides)
        yield {
            "row": "data: device-resident (la_mri augmentation)",
            "rate": resident,
            "result": f"{resident / needed:.2f}x what the step needs (target 1.5x)",
        }

    def quickstart(self) -> Iterator[dict]:
        shutil.rmtree(self.out / "runs" / "quickstart", ignore_errors=True)  # a rerun trains afresh
        start = time.perf_counter()
        with self.trainer("quickstart") as trainer:
            status = trainer.train()
            steps = trainer.state.global_step
        seconds = time.perf_counter() - start
        dice = last_logged(self.out / "runs" / "quickstart" / "metrics.jsonl", "val/dice")
        verdict = "" if status == 0 else f"WRONG: exit code {status}; "
        yield {
            "row": "quickstart training (the default config, seed 0)",
            "ms": seconds * 1e3 / max(steps, 1),
            "result": f"{verdict}{steps} steps in {seconds:.0f} s with generation and validation; "
            f"validation Dice {dice:.4f}",
        }

    def evaluate(self) -> Iterator[dict]:
        yield from one_volume(self.device, self.sizes)

    def checks(self) -> Iterator[dict]:
        yield from device_checks(self.device)

    def nccl(self) -> Iterator[dict]:
        yield collective_check(self.device)

    def trainer(self, name: str, *overrides: str):
        """A Trainer of the given overrides in this check's runs folder (a fresh run each time)."""
        cfg = load_config(
            None,
            [
                f"log.runs_dir={self.out / 'runs'}",
                f"log.run_name={name}",
                "log.wandb=disabled",
                "train.resume=auto",
                f"train.compile_backend={self.sizes.compile_backend}",
                *self.sizes.quickstart,
                *overrides,
            ],
        )
        return trainer_in(cfg, self.device)


def amp_label(amp: str) -> str:
    return "fp32" if amp == "off" else amp


@contextlib.contextmanager
def trainer_in(cfg: Config, device: torch.device) -> Iterator[Any]:
    """The Trainer of ``cfg`` on ``device``, in a runtime of its own that is left cleanly."""
    from ..trainer import Trainer  # the training stack, only for the groups that train

    cfg.train.device = device.type
    with runtime(device.type, 120) as env:
        trainer = Trainer(cfg, env)
        try:
            yield trainer
        finally:
            trainer.logger.finish()


def last_logged(metrics: Path, key: str) -> float:
    values = [json.loads(line).get(key) for line in metrics.read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    return values[-1] if values else float("nan")


def groupnorm_copies(device: torch.device, width: int) -> dict:
    """Layout copies in forward + backward of one GroupNorm residual block in channels_last_3d under bf16 autocast:
    a norm kernel that wants NCDHW shows as ``aten::copy_`` calls and their share of the block's device time (each
    op's self time: the kernels it launched itself, so nested ops are not counted twice)."""
    block = to_channels_last(ResBlock(width, width, "group").to(device))
    x = as_channels_last(torch.randn(2, width, 48, 48, 48, device=device)).requires_grad_(True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = block(x)
        out.float().sum().backward()
        synchronize(device)
    ops = [e for e in profile.key_averages() if e.key.startswith("aten::")]
    time_of = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    total = sum(time_of(e) for e in ops) or 1
    copies = [e for e in ops if e.key == "aten::copy_"]
    share = sum(time_of(e) for e in copies) / total
    where = "GPU" if device.type == "cuda" else "CPU"
    return {
        "row": "GroupNorm block in channels_last: layout copies",
        "result": f"{sum(e.count for e in copies)} aten::copy_ calls, {share:.0%} of the block's {where} time "
        "(forward + backward, bf16)",
    }


def one_volume(device: torch.device, sizes: Sizes) -> Iterator[dict]:
    torch.manual_seed(0)
    model = to_channels_last(ResUNet3D(widths=sizes.widths).to(device)).eval()
    image = torch.randn(1, *sizes.volume)

    def run() -> np.ndarray:
        return sliding_window_labels(
            model, image, sizes.crop, 2, batch_size=4, amp_dtype=torch.bfloat16, device=device, channels_last=True
        )

    seconds = timeit(run, repeat=max(1, sizes.repeat // 3), warmup=1)["median_s"]
    labels = run()
    voxels = float(np.prod(sizes.volume))
    yield {
        "row": "evaluate: sliding window (bf16, overlap 0.5)",
        "ms": seconds * 1e3,
        "rate": 1 / seconds,
        "result": f"{'x'.join(map(str, sizes.volume))}: {1 / seconds:.2f} volumes/s, {voxels / seconds / 1e6:.1f} "
        f"Mvoxel/s, {sizes.crop} windows",
    }
    grid = np.indices(sizes.volume).transpose(1, 2, 3, 0)
    centre, radii = np.array(sizes.volume) / 2, np.array(sizes.volume) / 4
    reference = (np.linalg.norm((grid - centre) / radii, axis=-1) < 1).astype(np.uint8)
    start = time.perf_counter()
    case_metrics(np.maximum(labels, reference[::-1].copy()), reference, (0.8, 0.8, 2.0), ["background", "organ"], True)
    yield {"row": "evaluate: medpy-exact metrics of one volume", "ms": (time.perf_counter() - start) * 1e3}


def device_checks(device: torch.device) -> Iterator[dict]:
    if device.type == "cuda":
        kind = "compute capability " + ".".join(map(str, torch.cuda.get_device_capability(device)))
        hardware = native_bf16(device)
    else:
        kind, hardware = "CPU: AVX512-BF16 or AMX", fast_cpu_bf16()
    picked = amp_name(resolve_amp("auto", device, crop=(64, 64, 48)))
    yield {"row": "bf16 in hardware", "result": f"{'yes' if hardware else 'no'} ({kind}); amp=auto picks {picked}"}
    cfg = Config()
    cfg.train.amp = "bf16"
    model = ResUNet3D(1, 2, (8, 8, 16, 16)).to(device)
    step = TrainStep(model, cfg, device, total_steps=10)
    before = [p.detach().clone() for p in model.parameters()]
    image = torch.randn(2, 1, 32, 32, 32, device=device)
    image[0, 0, 0, 0, 0] = float("nan")
    step(image, (image[:, 0] > 0).long())
    skipped = all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and int(step.nonfinite_run) == 1
    yield {"row": "a non-finite bf16 step is skipped, the weights untouched", "result": "ok" if skipped else "WRONG"}
    state = rng_state(device)
    expected = torch.rand(4, device=device)
    set_rng_state(state, device)
    restored = torch.equal(torch.rand(4, device=device), expected)
    yield {"row": "the device's RNG state restores from a checkpoint's", "result": "ok" if restored else "WRONG"}


def collective_worker(out: Path) -> None:
    with runtime("auto", 60, require_group=True) as env:
        grads = torch.ones(count_parameters(ResUNet3D()), device=env.device)
        seconds = timeit(lambda: c10d.all_reduce(grads), repeat=20, warmup=3)["median_s"]
        agreed = any_rank(True)  # through the gloo side group made at start-up
        ok = bool(grads[0] == 1) and agreed
        out.write_text(json.dumps({"backend": c10d.get_backend(), "allreduce_s": seconds, "ok": ok}))


def collective_check(device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "collective.json"
        command = [*torchrun_command(1), "-m", "unet3d_dist.bench", "gpu", "--collective-worker", str(out)]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "4",
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0" if device.type == "cuda" else ""),
        }
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun exited {done.returncode}: {done.stderr.strip()[-300:]}")
        result = json.loads(out.read_text())
    return {
        "row": "torchrun 1 process: gradient all-reduce and the gloo side group",
        "ms": result["allreduce_s"] * 1e3,
        "result": f"{result['backend']}: {'ok' if result['ok'] else 'WRONG'}",
    }


def run_group(check: DeviceCheck, group: str, recorder: RowRecorder) -> None:
    """Record the group's rows; a group that fails (no compiler, out of memory) is one row that says why."""
    rows: Callable[[], Iterator[dict]] = getattr(check, group)
    try:
        for row in rows():
            recorder.add({"group": group, **row})
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        recorder.add({"group": group, "row": f"{group}: failed", "result": f"{type(err).__name__}: {first}"})


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unet3d_dist.bench gpu", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu"), help="folder for gpu.jsonl, gpu.md")
    parser.add_argument("--only", nargs="+", choices=GROUPS, help="run these groups only (in the usual order)")
    parser.add_argument("--tiny", action="store_true", help="small sizes, 20 training steps: a rehearsal")
    parser.add_argument("--collective-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.collective_worker:
        collective_worker(args.collective_worker)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as every command on a GPU runs (dist.runtime)
    sizes = TINY if args.tiny else Sizes()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "no CUDA GPU: a rehearsal on the CPU"
    title = f"Device check: {where}, torch {torch.__version__}"
    recorder = RowRecorder(
        args.out, title, {**machine(), "sizes": sizes.__dict__, "datasheet_bf16_tflops": datasheet_tflops(device)}
    )
    check = DeviceCheck(device, sizes, args.out)
    for group in GROUPS:
        if args.only is None or group in args.only:
            run_group(check, group, recorder)
    if any("WRONG" in str(row.get("result")) for row in recorder.rows):
        sys.exit(1)
