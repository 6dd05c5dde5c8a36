"""End-to-end runs of the real command line on tiny models and crops."""

import json
import os
import signal
import subprocess
import sys

import torch
from conftest import assert_bitwise_equal, final_state, overrides, start, train, wait_for

TINY_RUN = (
    "train.epochs=10",
    "data.samples_per_epoch=16",
    "optim.lr=0.05",
    "optim.momentum=0.9",
    "train.val_every=5",
    "log.run_name=tiny",
)


def test_tiny_run_learns_and_leaves_checkpoints_and_a_loss_plot(tmp_path, tiny_dataset):
    result = train(tmp_path, tiny_dataset, *TINY_RUN)
    run = tmp_path / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 80
    assert sum(losses[-8:]) < 0.5 * sum(losses[:8]), losses
    assert [r["val/dice"] for r in rows if "val/dice" in r][-1] > 0.8
    png = (run / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["best.pt", "ckpt-00000072.pt", "ckpt-00000080.pt"]  # keep_last=2 plus best
    ckpt = torch.load(run / "checkpoints" / "ckpt-00000080.pt", weights_only=True)
    assert ckpt["train_state"]["global_step"] == 80 and ckpt["train_state"]["epoch"] == 10
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert (run / "config.yaml").is_file()
    assert "validation Dice" in result.stdout and "done" in result.stdout

    # Every class of these cases is one piece, so the manifest advises the largest component, training keeps that in
    # the checkpoint, and a plain evaluate applies it and says so in results.json.
    assert json.loads((tiny_dataset / "manifest.json").read_text())["largest_component"] is True
    assert ckpt["config"]["inference"]["largest_component"] is True
    out = tmp_path / "eval"
    evaluate = [sys.executable, "-m", "unet3d_dist.evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt")]
    evaluate += ["--split", "val", "--panels", "0", "--out", str(out)]
    done = subprocess.run(evaluate, capture_output=True, text=True, env=os.environ | {"WANDB_MODE": "disabled"})
    assert done.returncode == 0 and "largest component=yes" in done.stdout, done.stdout + done.stderr
    assert json.loads((out / "results.json").read_text())["largest_component"] is True

    # The same command again: the run is complete, so it says so and leaves every file as it was.
    def files() -> dict:  # the lock file records who holds the run directory, which is each run anew
        return {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != "run.lock"}

    before = files()
    again = train(tmp_path, tiny_dataset, *TINY_RUN)
    assert f"run {run} is already complete (80 steps, 10 epochs; best validation Dice" in again.stdout
    assert "resumed" not in again.stdout
    assert files() == before


def test_config_errors_exit_with_one_clear_line(tmp_path, tiny_dataset):
    result = train(tmp_path, tiny_dataset, "optim.lr=fast", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: optim.lr must be a number, not 'fast'"


def test_missing_dataset_is_named(tmp_path):
    result = train(tmp_path, tmp_path / "nowhere", check=False)
    assert result.returncode == 2 and "nowhere has no manifest.json" in result.stderr


def test_a_hand_edited_manifest_stops_the_run_with_one_line_naming_it(tmp_path, tiny_dataset):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(tiny_dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["cases"][0]["shape"] = [41, 36, 28]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = train(tmp_path, copy, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and f"{copy / 'manifest.json'} gives case 'a' shape as [41, 36, 28]" in (
        result.stderr
    )
    assert not list(tmp_path.glob("*/checkpoints/*"))


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dataset):
    import numpy as np
    from conftest import box_case

    from unet3d_dist.data.shards import write_dataset

    train(tmp_path, tiny_dataset, "train.epochs=1", "log.run_name=div")
    good = tmp_path / "div" / "checkpoints" / "ckpt-00000004.pt"
    before = good.read_bytes()
    # Finite but absurd intensities overflow float32 inside the network: every step on resume is skipped, and the
    # third in a row stops the run.
    case = box_case("huge", (24, 24, 16), np.s_[4:12, 4:12, 4:10], "train", 0)
    case.image = case.image * np.float32(1e36)
    write_dataset(tmp_path / "huge", [case], ["background", "box"], name="huge", modality="CT", preprocessing={})
    result = train(
        tmp_path, tmp_path / "huge", "train.epochs=3", "train.max_nonfinite=3", "log.run_name=div", check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "non-finite steps in a row" in result.stderr and "the last good checkpoint" in result.stderr
    assert sorted(p.name for p in good.parent.glob("ckpt-*.pt")) == [good.name]
    assert good.read_bytes() == before


def test_a_corrupt_chunk_in_a_loader_worker_stops_the_run_with_one_line_and_no_checkpoint(tmp_path):
    import numpy as np
    from conftest import box_case, flip_byte_in_chunk

    from unet3d_dist.data.shards import write_dataset

    # The only training case is one chunk, so every crop reads the corrupt bytes.
    cases = [
        box_case("one", (16, 16, 12), np.s_[4:12, 4:12, 3:9], "train", 0),
        box_case("v", (16, 16, 12), np.s_[2:9, 2:9, 2:9], "val", 1),
    ]
    root = tmp_path / "data"
    write_dataset(root, cases, ["background", "box"], name="corrupt", modality="CT", preprocessing={})
    flip_byte_in_chunk(root / "shard-00000.h5", "one", "image")
    result = train(tmp_path, root, "train.epochs=1", "data.num_workers=2", "log.run_name=corrupt", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.endswith("\n") and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(
        f"error: cannot read the image of case 'one' from shard {root / 'shard-00000.h5'}: a chunk is corrupt"
    )
    assert (
        f"run python -m unet3d_dist.prepare --verify {root} and prepare" in result.stderr
        and "note:" not in result.stdout
    )
    run = tmp_path / "corrupt"
    assert (run / "config.yaml").is_file() and not list(
        run.rglob("*.pt")
    )  # the run started; nothing of the broken step was saved


def test_a_dataset_prepared_before_checksums_trains_with_a_one_line_note(tmp_path, unchecksummed_dataset):
    from unet3d_dist.data.shards import ShardedDataset

    result = train(tmp_path, unchecksummed_dataset, "train.epochs=1", "log.run_name=old")
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert (
        notes == [f"note: {ShardedDataset(unchecksummed_dataset).checksum_note}"]
        and "without chunk checksums" in notes[0]
    )
    assert "done" in result.stdout


def test_a_resume_in_another_precision_starts_the_loss_scaler_afresh(tmp_path, tiny_dataset):
    train(tmp_path, tiny_dataset, "train.epochs=1", "train.amp=off", "log.run_name=precision")
    resumed = train(tmp_path, tiny_dataset, "train.epochs=2", "train.amp=fp16", "log.run_name=precision")
    assert "precision: off -> fp16; the loss scaler starts afresh" in resumed.stdout
    ckpt = torch.load(tmp_path / "precision" / "checkpoints" / "ckpt-00000008.pt", weights_only=True)
    assert ckpt["precision"] == "fp16" and ckpt["scaler"]["scale"] > 1  # fp16 scales the loss from now on


def test_a_compiled_run_killed_and_resumed_ends_bitwise_where_the_eager_run_does(tmp_path, tiny_dataset):
    """torch.compile (the aot_eager backend traces the graphs inductor gets and runs them with aten) changes nothing
    a checkpoint holds: a compiled run killed after a checkpoint and resumed compiled ends exactly where an eager run
    does. The resolved memory format is stored with the run and kept on resume."""
    compiled = ("train.compile=on", "train.compile_backend=aot_eager")
    length = ("train.epochs=4", "train.val_every=0")
    eager = train(tmp_path, tiny_dataset, *length, "log.run_name=eager", "train.compile=off")
    assert "layout: channels_last_3d on (auto: on, the faster format on CPUs)  compile: off" in eager.stdout
    command = [sys.executable, "-m", "unet3d_dist.train", *overrides(tiny_dataset, tmp_path, "compiled", *length)]
    process = start([*command, *compiled])
    wait_for(tmp_path / "compiled" / "checkpoints" / "ckpt-00000004.pt", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert final_state(tmp_path / "compiled")["train_state"]["global_step"] < 16, "it finished before the kill"
    resumed = subprocess.run([*command, *compiled], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "channels_last_3d on (auto: on, as the checkpoint records)  compile: aot_eager" in resumed.stdout
    ends = final_state(tmp_path / "compiled")
    assert_bitwise_equal(final_state(tmp_path / "eager"), ends)
    assert ends["config"]["train"]["channels_last"] == "on"
    assert not any(name.startswith("_orig_mod") for name in ends["model"])
