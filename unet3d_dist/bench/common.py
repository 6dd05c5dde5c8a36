"""Shared benchmark plumbing: timing with warm-up, a rich table, and a JSON record with the machine."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and process-CPU seconds of one call, with the GPU's queued work included.

    On a shared machine, wall time swings with other people's load; this process's CPU time hardly does.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median and minimum wall seconds (and median CPU seconds) of ``fn`` over ``repeat`` runs after ``warmup`` runs."""
    return compare({"fn": fn}, repeat, warmup)["fn"]


def compare(fns: dict[str, Callable[[], Any]], repeat: int = 5, warmup: int = 1) -> dict[str, dict[str, float]]:
    """``timeit`` for several functions whose runs alternate, so load from other processes hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            runs[name].append(timed(fn))
    return {
        name: {
            "median_s": statistics.median(w for w, _ in times),
            "min_s": min(w for w, _ in times),
            "cpu_median_s": statistics.median(c for _, c in times),
            "repeat": repeat,
        }
        for name, times in runs.items()
    }


def machine() -> dict[str, Any]:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, "-m", "unet3d_dist.bench", *sys.argv[1:]]),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report(title: str, columns: list[str], rows: list[list[Any]], record: dict[str, Any], out: Path | None) -> None:
    """Print a table and write ``{"machine": ..., **record}`` as JSON to ``out`` (if given)."""
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    Console().print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), **record}, indent=1))
        Console().print(f"wrote {out}")
