"""The benchmark command runs each part for real, at toy sizes, and records what docs/PERFORMANCE.md quotes."""

import json
import statistics
import subprocess
import sys

from conftest import TINY

from unet3d_dist.model import ResUNet3D, count_parameters


def bench(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "unet3d_dist.bench", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"bench {args[0]} exited {result.returncode}\n{result.stdout}\n{result.stderr}"


def test_an_unknown_part_lists_the_parts():
    result = subprocess.run([sys.executable, "-m", "unet3d_dist.bench", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and "train_step" in result.stderr and "ddp" in result.stderr


def test_help_lists_every_part_with_what_it_measures():
    import pkgutil

    import unet3d_dist.bench as package
    from unet3d_dist.bench.__main__ import PARTS

    result = subprocess.run([sys.executable, "-m", "unet3d_dist.bench", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.endswith("\n")
    helpers = {"__main__", "common", "record", "host_sync"}  # shared by the parts, not parts themselves
    modules = {m.name for m in pkgutil.iter_modules(package.__path__)} - helpers
    assert set(PARTS) == modules
    for part, what in PARTS.items():
        assert f"  {part}" in result.stdout and what in result.stdout


def test_ddp_compares_ddp_with_independent_processes_and_times_the_gradient_all_reduce(tmp_path):
    bench("ddp", "--crop", "16", "16", "16", "--batch", "1", "--steps", "1", "--out", str(tmp_path / "ddp.json"))
    record = json.loads((tmp_path / "ddp.json").read_text())
    assert [record[k]["world_size"] for k in ("one_rank", "two_independent", "two_ranks")] == [1, 2, 2]
    assert "allreduce" not in record["two_independent"]  # no process group traffic without DDP
    assert record["allreduce_mb"] * 1e6 == 4 * count_parameters(ResUNet3D())  # fp32 gradients of the default model
    assert record["ddp_efficiency"] > 0 and record["machine"]["command"].startswith("python -m unet3d_dist.bench ddp")


def test_train_step_measures_each_requested_variant_against_the_conv3d_peak(tmp_path):
    bench(
        "train_step",
        "--crop",
        "32",
        "32",
        "32",
        "--batch",
        "1",
        "--repeat",
        "1",
        "--amp",
        "off",
        "--compile",
        "off",
        "--heap",
        "kept",
        "glibc",
        "--out",
        str(tmp_path / "step.json"),
    )
    record = json.loads((tmp_path / "step.json").read_text())
    ours = [r for r in record["results"] if r["model"].endswith("(ours)")]
    # glibc's default heap first: keeping freed memory is a setting for the rest of the process
    assert [(r["heap"], r["amp"], r["channels_last"], r["compile"]) for r in ours] == [
        ("glibc", "off", True, False),
        ("glibc", "off", False, False),
        ("kept", "off", True, False),
        ("kept", "off", False, False),
    ]
    kept = [r for r in record["results"] if r["heap"] == "kept"]
    assert all(r["peak_gflops"] > 0 for r in ours) and record["peak_gflops"] == statistics.median(
        r["peak_gflops"] for r in kept
    )
    for r in ours:  # each against the conv timed beside it; glibc rows against the machine's peak (the kept heap's)
        peak = r["peak_gflops"] if r["heap"] == "kept" else record["peak_gflops"]
        assert r["gflop_per_step"] > 0 and abs(r["fraction_of_peak"] - r["gflops"] / peak) < 1e-9


def test_the_step_benchmark_trains_a_compiled_model():
    """The compiled variant runs the training's step through torch.compile's module (it once failed on
    ``net or model``, which asks a compiled module for its length). The eager backend wraps the model the same way
    without inductor's C++ compilation (49 s in CI, on a cold cache)."""
    import torch

    from unet3d_dist.bench.train_step import make_step

    model = ResUNet3D(widths=(4, 8, 8, 16))
    before = [p.detach().clone() for p in model.parameters()]
    make_step(model, 1, (16, 16, 8), "off", False, torch.device("cpu"), torch.compile(model, backend="eager"))()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_pipeline_reports_the_data_wait_and_efficiency_of_the_real_loop(tmp_path, tiny_dataset):
    bench(
        "pipeline",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "pipeline.json"),
        f"data.dataset={tiny_dataset}",
        *TINY,
        "data.samples_per_epoch=20",
    )
    record = json.loads((tmp_path / "pipeline.json").read_text())
    assert record["steps"] == 2 and record["crop"] == [16, 16, 8]
    assert (
        0 <= record["data_wait_fraction"] < 1
        and abs(record["efficiency"] - record["pure_ms"] / record["real_ms"]) < 1e-9
    )


def test_checkpoint_times_the_atomic_save_against_torch_save_in_memory(tmp_path):
    bench("checkpoint", "--dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ckpt.json"))
    record = json.loads((tmp_path / "ckpt.json").read_text())
    assert record["model_parameters"] == count_parameters(ResUNet3D())
    assert record["bytes"] > 2 * 4 * record["model_parameters"]  # fp32 weights and SGD momentum buffers
    assert {"save", "load", "reference_in_memory"} <= record.keys()


def test_data_measures_every_layout_with_checksums_and_the_default_also_without(tmp_path, tiny_dataset):
    bench("data", "--dataset", str(tiny_dataset), "--crops", "2", "--out", str(tmp_path / "data.json"))
    record = json.loads((tmp_path / "data.json").read_text())
    layouts = [(tuple(v["chunks"]), v["compression"], v["checksums"]) for v in record["variants"]]
    assert len(layouts) == 13 and layouts[1:3] == [((16, 16, 16), "lzf", True), ((16, 16, 16), "lzf", False)]
    assert sum(not checksums for *_, checksums in layouts) == 1
    on, off = record["variants"][1:3]
    assert (
        record["checksum_cost"]["crops_per_cpu_s"]["64x64x48"]
        == on["64x64x48"]["crops_per_cpu_s"] / off["64x64x48"]["crops_per_cpu_s"]
    )
    assert on["disk_mb"] > off["disk_mb"]  # 4 bytes of checksum per chunk


def test_loader_reports_each_workers_rate_and_the_workers_a_gpu_needs(tmp_path, tiny_dataset):
    bench(
        "loader", "--dataset", str(tiny_dataset), "--crops", "8", "--step-ms", "20", "--out", str(tmp_path / "l.json")
    )
    record = json.loads((tmp_path / "l.json").read_text())
    rates = record["crops_per_worker_per_s"]
    assert set(rates) == {"plain crops", "augmented in the workers (cpu)", "augmented, the workers' share (device)"}
    assert record["crop"] == [112, 112, 80] and record["crops_needed_per_s"] == 2 / 0.02  # la_mri: 2 crops a step
    assert all(record["workers_needed"][name] >= 100 / rate for name, rate in rates.items())
    assert record["device_ms_per_crop"] > 0


def test_stitch_compares_whole_volume_and_slab_stitching_in_fresh_processes(tmp_path):
    out = tmp_path / "eval.json"
    bench(*"eval --part stitch --stitch-shape 24 18 12 --classes 3 --patch 8 8 8".split(), "--out", str(out))
    record = json.loads(out.with_suffix(".stitch.json").read_text())
    assert record["label_agreement"] == 1.0
    for run in record["runs"].values():
        assert run["peak"] >= run["ready"] > 0 and run["wall_s"] > 0 and run["largest_cube_in_16_gib"] >= 16
