"""Data benchmark: ``python -m unet3d_dist.bench data [--input FOLDER --config RECIPE | --dataset DATASET]``.

1. Prepare throughput: the real ``prepare`` on the input: cases/s and MB/s (input files read, voxels written), by
   wall clock and per CPU second of all its processes.
2. For every chunk shape x compression: the same cases rewritten through the shard writer, then training crops read
   through the real ``CropDataset``: bytes the process reads from the shard files per crop divided by the crop's own
   bytes (image float32 + label uint8; from /proc/self/io ``rchar``, every byte HDF5 asks the kernel for, page cache
   or not), and crops per CPU second in one process, which is what one DataLoader worker delivers with a core to
   itself. Every layout carries the writer's fletcher32 chunk checksums; the default layout is also measured without
   them, right after, and their cost is the ratio of the two.

CPU seconds rather than wall seconds make the figures stable on a machine shared with other work. Reads run with a
warm page cache, so crops/s is the CPU cost (decompression, copies); the byte ratio is what a cold cache or a network
file system would have to move.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ..data.crops import CropDataset
from ..data.shards import DEFAULT_CHUNKS, DEFAULT_COMPRESSION, Case, ShardedDataset, write_dataset
from ..files import size_on_disk
from ..preparation.build import prepare
from ..preparation.preprocess import dims
from ..preparation.recipe import load_recipe
from .common import report

CHUNKS = ((16, 16, 16), (32, 32, 16), (32, 32, 32), (64, 64, 32))
COMPRESSIONS = ("none", "lzf", "gzip")
CROPS = ((64, 64, 48), (112, 112, 80))
Layout = tuple[tuple[int, int, int], str, bool]  # chunk shape, compression, fletcher32 checksums


def layouts() -> list[Layout]:
    """Every chunk shape x compression with checksums, and the default layout without them measured right after it."""
    with_checksums = [(chunks, compression, True) for chunks in CHUNKS for compression in COMPRESSIONS]
    default = with_checksums.index((DEFAULT_CHUNKS, DEFAULT_COMPRESSION, True))
    return [
        *with_checksums[: default + 1],
        (DEFAULT_CHUNKS, DEFAULT_COMPRESSION, False),
        *with_checksums[default + 1 :],
    ]


def checksum_cost(variants: list[dict]) -> dict[str, Any]:
    """The default layout with checksums against without: ratios of crops per CPU s (per crop size) and write speed."""
    default = {
        v["checksums"]: v
        for v in variants
        if (tuple(v["chunks"]), v["compression"]) == (DEFAULT_CHUNKS, DEFAULT_COMPRESSION)
    }
    on, off = default[True], default[False]
    return {
        "crops_per_cpu_s": {dims(c): on[dims(c)]["crops_per_cpu_s"] / off[dims(c)]["crops_per_cpu_s"] for c in CROPS},
        "write_mb_per_cpu_s": on["write_mb_per_cpu_s"] / off["write_mb_per_cpu_s"],
    }


def read_bytes() -> int:
    """Bytes this process has asked the kernel to read so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def cpu_seconds() -> float:
    """User + system time of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_prepare(recipe_path: Path, inputs: list[Path], out: Path, jobs: int) -> dict[str, float]:
    recipe = load_recipe(recipe_path)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    prepare(recipe, inputs, out, jobs=jobs, overwrite=False, split_file=None, console=Console(quiet=True))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    data = ShardedDataset(out)
    cases, in_mb = len(data.records), size_on_disk(inputs) / 1e6
    out_mb = sum(int(np.prod(r["shape"])) for r in data.records.values()) * 5 / 1e6  # float32 image + uint8 label
    return {
        "cases": cases,
        "jobs": jobs,
        "input_mb": in_mb,
        "voxel_mb": out_mb,
        "wall_s": seconds,
        "cases_per_s": cases / seconds,
        "input_mb_per_s": in_mb / seconds,
        "voxel_mb_per_s": out_mb / seconds,
        "cpu_s": cpu,
        "cases_per_cpu_s": cases / cpu,
        "input_mb_per_cpu_s": in_mb / cpu,
        "voxel_mb_per_cpu_s": out_mb / cpu,
    }


def load_cases(root: Path) -> tuple[list[Case], dict]:
    data = ShardedDataset(root)
    cases = [
        Case(
            i, data.image(i), data.label(i), tuple(r["spacing"]), tuple(r["origin"]), tuple(r["direction"]), r["split"]
        )
        for i, r in data.records.items()
    ]
    return cases, data.manifest


def bench_crops(root: Path, crop: tuple[int, int, int], count: int) -> dict[str, float]:
    """Bytes read per crop / crop bytes, and crops per CPU second, for training crops of the train split."""
    data = ShardedDataset(root)
    crops = CropDataset(data, data.case_ids("train") or data.case_ids(), crop, count, seed=0)
    crops[(99, 0)]  # open the shard handles outside the measurement
    before, start = read_bytes(), time.process_time()
    for index in range(count):
        crops[(0, index)]
    seconds, read = time.process_time() - start, read_bytes() - before
    data.close()
    return {"read_ratio": read / (count * int(np.prod(crop)) * 5), "crops_per_cpu_s": count / seconds}


def bench_layout(
    root: Path, cases: list[Case], classes: list[str], voxel_mb: float, layout: Layout, count: int
) -> dict[str, Any]:
    """Write the cases with one layout, then read ``count`` training crops of each size from it."""
    chunks, compression, checksums = layout
    start = time.process_time()
    written = write_dataset(
        root,
        cases,
        classes,
        name="bench",
        modality="",
        preprocessing={},
        compression=compression,
        chunks=chunks,
        checksums=checksums,
    )
    write_s = time.process_time() - start
    variant = {
        "chunks": list(chunks),
        "compression": compression,
        "checksums": checksums,
        "disk_mb": sum(s["bytes"] for s in written["shards"]) / 1e6,
        "write_mb_per_cpu_s": voxel_mb / write_s,
    }
    variant.update({dims(crop): bench_crops(root, crop, count) for crop in CROPS})
    shutil.rmtree(root)
    return variant


def table_rows(variants: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per layout and crop size."""
    return [
        [
            dims(v["chunks"]),
            v["compression"],
            "fletcher32" if v["checksums"] else "none",
            dims(crop),
            v[dims(crop)]["read_ratio"],
            v[dims(crop)]["crops_per_cpu_s"],
            v["disk_mb"],
            v["write_mb_per_cpu_s"],
        ]
        for v in variants
        for crop in CROPS
    ]


COLUMNS = [
    "chunks",
    "compression",
    "checksums",
    "crop",
    "read / crop bytes",
    "crops per CPU s",
    "disk MB",
    "write MB per CPU s",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The input to prepare (or a prepared dataset) and how many crops each layout reads."""
    parser = argparse.ArgumentParser(prog="python -m unet3d_dist.bench data", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        type=Path,
        nargs="+",
        default=[Path("data/raw/la_mri")],
        help="scans to prepare (the left atrium .h5 files)",
    )
    parser.add_argument(
        "--config", type=Path, default=Path("configs/prepare_la_mri.yaml"), help="prepare recipe for --input"
    )
    parser.add_argument("--dataset", type=Path, help="an already prepared dataset: skip the prepare step")
    parser.add_argument("--jobs", type=int, default=2, help="prepare worker processes")
    parser.add_argument("--crops", type=int, default=100, help="crops read per chunking/compression/crop size")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        work = Path(scratch)
        record: dict = {"crops_per_measure": args.crops}
        if args.dataset is None:
            args.dataset = work / "prepared"
            record["prepare"] = bench_prepare(args.config, args.input, args.dataset, args.jobs)
            p = record["prepare"]
            Console().print(
                f"prepare: {p['cases']} cases ({p['input_mb']:.0f} MB of files, {p['voxel_mb']:.0f} MB of voxels) "
                f"with {p['jobs']} processes: "
                f"{p['wall_s']:.1f} s wall = {p['cases_per_s']:.2f} cases/s, {p['input_mb_per_s']:.1f} MB/s in, "
                f"{p['voxel_mb_per_s']:.1f} MB/s out; "
                f"{p['cpu_s']:.1f} CPU s = {p['cases_per_cpu_s']:.2f} cases, {p['input_mb_per_cpu_s']:.1f} MB in, "
                f"{p['voxel_mb_per_cpu_s']:.1f} MB out per CPU second"
            )
        cases, manifest = load_cases(args.dataset)
        record["dataset"] = {
            "name": manifest["name"],
            "cases": len(cases),
            "voxel_mb": sum(c.image.size for c in cases) * 5 / 1e6,
        }
        voxel_mb = record["dataset"]["voxel_mb"]
        variants = [
            bench_layout(work / f"layout-{i}", cases, manifest["classes"], voxel_mb, layout, args.crops)
            for i, layout in enumerate(layouts())
        ]
        record["variants"] = variants
        record["checksum_cost"] = checksum_cost(variants)
    report(
        f"crop reads from {record['dataset']['name']} ({record['dataset']['cases']} cases, "
        f"{record['dataset']['voxel_mb']:.0f} MB of voxels)",
        COLUMNS,
        table_rows(variants),
        record,
        args.out,
    )
    cost = record["checksum_cost"]
    crops = ", ".join(f"{ratio:.3f} ({crop})" for crop, ratio in cost["crops_per_cpu_s"].items())
    Console().print(
        f"fletcher32 checksums on {dims(DEFAULT_CHUNKS)} {DEFAULT_COMPRESSION} chunks, with / without: crops per "
        f"CPU s {crops}; "
        f"write MB per CPU s {cost['write_mb_per_cpu_s']:.3f}"
    )
