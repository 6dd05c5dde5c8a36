"""Prediction on new scans, a mask on each one's own grid: ``python -m unet3d_dist.predict INPUT... --out DIR``.

An INPUT is one scan: a NIfTI/NRRD/MHA file or a DICOM series folder, no label; for a model trained on several
channels, one file per channel joined by commas in the checkpoint's channel order, or one 4-D file. An INPUT that is
a folder but not a DICOM series stands for the scans directly in it, by name: its NIfTI/NRRD/MHA files and its
subfolders that are DICOM series (other files are left alone). ``--input-list FILE`` names one scan per line
(channels joined by commas; blank lines and ``#`` comments skipped; relative paths relative to the file). A folder or
list without scans, or a folder that is also ``DIR``, is refused in one sentence (exit status 2).

Each scan goes through the preprocessing its training data had (the manifest's ``preprocessing``, stored in the
checkpoint): reorientation, resampling, normalisation of each channel. The gaussian sliding window runs with the
training crop as its patch (overlap, flip averaging and largest-component post-processing as the checkpoint's
``inference`` section says; an input smaller than the patch is padded, and a line says so), and the class map is
moved back onto the input's own grid by nearest neighbour, so ``DIR/<name>_mask.<format>`` (``--format nii.gz``,
``nrrd`` or ``mha``) has the input's exact size, spacing, origin and direction. Voxel values are indices into the
checkpoint's classes. ``DIR/<name>_panel.png`` shows three slices (of the first channel); ``--no-panels`` leaves it
out. ``DIR`` defaults to ``<run dir>/predictions`` (``runs/<name>/predictions`` for ``runs/<name>/checkpoints/<file>``).

Several checkpoints predict as one ensemble (``segmenter.py``): the input is prepared like the first member's
training data; a member trained at another spacing sees it resampled to that spacing, with its own patch and flips;
their softmax probabilities, on the first member's grid, are averaged before the argmax.

Resuming: the panel is written before the mask, each atomically, so a mask in ``DIR`` marks a finished scan, and a
run skips those (unless ``--overwrite``); an interrupted run is resumed by the same command. Under torchrun rank 0
holds ``DIR`` (``run.lock``, run_lock.py) before any rank writes there, so a second prediction into it is refused
naming the first; it then removes what a killed run left half-written, leaves out the finished scans and deals the
rest to the ranks by size, so every rank takes a disjoint share of the work left. Rank 0 shows a live bar of all
ranks' masks on a terminal; in a log every rank prints one ``wrote`` line per scan. At the end rank 0 prints one
line: scans predicted, already done and failed, seconds and ranks. A bad input (unreadable, or with NaN or infinite
voxels, refused as ``prepare`` refuses it) is reported with one sentence and skipped (exit status 3, which
``python -m unet3d_dist.torchrun`` passes on); nothing is written for it and it does not stop the others.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from .checkpoint import default_output
from .dist import DistEnv, broadcast_from_main, gather_to_main, on_main, runtime
from .exit_codes import SOME_SKIPPED
from .files import LINK_LOOP, OutputError, atomic_write, is_link_loop, remove_unfinished, size_on_disk
from .lines import say
from .logger import progress_bar
from .optional import require, sitk
from .preparation.preprocess import CANONICAL_ORIENTATION, intensity_line, padding_line, reorient
from .preparation.readers import CaseError, array_xyz, read_channels
from .report import DISPLAY_WINDOWS, slice_panel
from .run_lock import hold_out
from .scans import Outputs, Scan, expand_inputs, output_paths
from .scoring import balanced_shards
from .segmenter import Segmenter, read_checkpoints


@dataclass(frozen=True)
class Plan:
    """What rank 0 decided under ``--out``'s lock, the same for every rank."""

    shares: list[list[tuple[Scan, Outputs]]]  # each rank's scans still to predict, with their outputs
    already_done: int  # scans skipped because their mask exists
    live: bool  # rank 0 shows a live progress bar (its console is a terminal), so no rank prints a line per scan


def plan_work(paths: dict[Scan, Outputs], overwrite: bool, world_size: int, live: bool = False) -> Plan:
    """Skip the scans whose mask exists (written atomically, so it is complete) unless ``overwrite``, then share out
    the rest by size: decided before sharing, so a resumed run splits only the work left."""
    todo = {scan_key(scan): scan for scan, (mask, _) in paths.items() if overwrite or not mask.exists()}
    shares = balanced_shards({key: size_on_disk(scan) for key, scan in todo.items()}, world_size)
    return Plan([[(todo[key], paths[todo[key]]) for key in share] for share in shares], len(paths) - len(todo), live)


def scan_key(scan: Scan) -> str:
    return ",".join(map(str, scan))


def claim_out(paths: dict[Scan, Outputs], out: Path, overwrite: bool, world_size: int) -> Plan:
    """Rank 0, before any rank writes: hold ``out`` for this process (run_lock; refused if another job has it or it
    cannot be written), remove what a killed run left half-written, and plan the work now that no other job writes
    there."""
    hold_out(out)  # held until this process ends
    remove_unfinished(out)
    return plan_work(paths, overwrite, world_size, live=Console().is_terminal)


def predict_file(segmenter: Segmenter, scan: Scan, mask_path: Path, panel_path: Path | None) -> None:
    """Write the slice panel (unless None), then the mask, of one input, each file atomically: a mask that exists
    marks a finished input, which a rerun skips. Say if the input is padded or unlike the training data."""
    trained = segmenter.checkpoints[0]
    whose = "the checkpoint was trained on" if len(segmenter.members) == 1 else "the ensemble was trained on"
    channels = read_channels(scan, trained.channels, whose)
    path = scan[0]
    prepared = segmenter.prepare(channels)
    patch = segmenter.members[0].patch
    for line in (
        intensity_line(path, channels, trained.channels, trained.intensity_range),
        padding_line(path, prepared[0], patch),
    ):
        if line:
            say(line)
    mask = segmenter.segment_scan(channels, prepared)
    if panel_path is not None:
        write_panel(segmenter, channels[0], mask, panel_path, path.name)  # the panel shows the first channel
    atomic_write(mask_path, lambda tmp: sitk.WriteImage(mask, str(tmp), useCompression=True))


def write_panel(segmenter: Segmenter, image: sitk.Image, mask: sitk.Image, panel_path: Path, title: str) -> None:
    """Three slices of ``image`` with ``mask``, titled with the classes found."""
    # report.slice_panel draws LPS arrays the radiological way
    shown_image, shown_mask = reorient(image, CANONICAL_ORIENTATION), array_xyz(reorient(mask, CANONICAL_ORIENTATION))
    counts = np.bincount(shown_mask.ravel(), minlength=len(segmenter.classes))
    names = [f"{name} ({counts[i]} voxels)" if i else name for i, name in enumerate(segmenter.classes)]
    found = (
        ", ".join(names[1:]) if len(names) == 2 else f"{int((counts[1:] > 0).sum())} of {len(names) - 1} classes found"
    )
    atomic_write(
        panel_path,
        lambda tmp: slice_panel(
            array_xyz(shown_image),
            None,
            shown_mask,
            shown_image.GetSpacing(),
            tmp,
            f"{title}: {found}",
            DISPLAY_WINDOWS.get(segmenter.checkpoints[0].modality),
            names,
        ),
    )


PROGRESS_POLL_S = 1.0


class ScanProgress:
    """Rank 0's view of the whole job. On a terminal, a live bar counts every rank's masks as they appear in
    ``--out`` (one listing a second, no messages between ranks) and shows rank 0's latest scan; elsewhere (a log
    file) every rank prints one ``wrote`` line per scan, which reads and greps better than a redrawn bar."""

    def __init__(self, env: DistEnv, plan: Plan, out: Path):
        self.prefix = f"rank {env.rank} " if env.multi_rank else ""
        self.live, self.out, self.bar, self.watcher = plan.live, out, None, None
        if not (plan.live and env.is_main):
            return
        masks = [outputs[0] for share in plan.shares for _, outputs in share]
        self.before = {mask.name: inode(mask) for mask in masks}  # --overwrite: an old mask is not a new one
        self.bar = progress_bar(Console(highlight=False))
        ranks = f" on {env.world_size} ranks" if env.multi_rank else ""
        self.task = self.bar.add_task(f"predicting{ranks}", total=len(masks), now="")
        self.stopped = threading.Event()
        self.watcher = threading.Thread(target=self.watch, name="predict-progress", daemon=True)

    def __enter__(self) -> ScanProgress:
        if self.bar is not None:
            self.bar.start()
            self.watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.stopped.set()
            self.watcher.join()
            self.bar.stop()

    def watch(self) -> None:
        while not self.stopped.wait(PROGRESS_POLL_S):
            with contextlib.suppress(OSError):  # a listing that fails now and then only delays the count
                self.bar.update(self.task, completed=self.written())

    def written(self) -> int:
        """Masks of this run in ``--out``: new names, or a new file (another inode) under an old one."""
        with os.scandir(self.out) as entries:
            return sum(entry.name in self.before and entry.inode() != self.before[entry.name] for entry in entries)

    def wrote(self, scan: Scan, outputs: Outputs) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.written(), now=scan[0].name)
        elif not self.live:
            mask, panel = outputs
            say(f"{self.prefix}wrote {mask} and {panel}" if panel else f"{self.prefix}wrote {mask}")


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def predict_share(
    segmenter: Segmenter, share: list[tuple[Scan, Outputs]], progress: ScanProgress
) -> tuple[int, list[str]]:
    """This rank's scans, one by one; a bad scan's sentence is kept for the end and the others go on. Returns the
    number of masks written and the sentences."""
    written, failures = 0, []
    for scan, outputs in share:
        try:
            predict_file(segmenter, scan, *outputs)
        except CaseError as err:
            failures.append(str(err))
            continue
        written += 1
        progress.wrote(scan, outputs)
    return written, failures


def summary_line(written: int, already_done: int, failed: int, seconds: float, world_size: int) -> str:
    """The run in one line, so a resumed run shows what it took over and what it left."""
    total, ranks = written + already_done + failed, "1 rank" if world_size == 1 else f"{world_size} ranks"
    return (
        f"predicted {written} of {total} scan{'s' if total != 1 else ''} in {seconds:.1f} s on {ranks}; "
        f"{already_done} already done, {failed} failed"
    )


def run(args: argparse.Namespace, out: Path) -> tuple[Plan, list[tuple[int, list[str]]] | None, int]:
    """Expand the inputs, claim ``out`` and predict this rank's share; rank 0 gets every rank's outcome."""
    if is_link_loop(out):
        raise CaseError(f"--out {out} {LINK_LOOP}; choose another --out")
    inputs = expand_inputs(args.inputs, args.input_list, out)
    require("SimpleITK", "predict (reading scans, writing masks)", "SimpleITK")
    loaded = read_checkpoints(args.checkpoint)
    paths = output_paths(inputs, out, args.format, args.panels)
    with runtime(args.device) as env:
        claim = functools.partial(claim_out, paths, out, args.overwrite, env.world_size)
        plan = broadcast_from_main(on_main(env, claim, (CaseError, OutputError)))
        segmenter = Segmenter.from_checkpoints(loaded, env.device, args)
        with ScanProgress(env, plan, out) as progress:
            outcome = predict_share(segmenter, plan.shares[env.rank], progress)
        return plan, gather_to_main(outcome), env.world_size


def predict_and_report(args: argparse.Namespace, started: float) -> int:
    """Predict every scan; rank 0 names the skipped ones and prints the summary line. The exit code."""
    plan, gathered, world_size = run(args, args.out or default_output(args.checkpoint, "predictions"))
    if gathered is None:  # not rank 0, which reports for all
        return 0
    failed = [line for _, lines in gathered for line in lines]
    for line in failed:
        print(f"skipped: {line}", file=sys.stderr)
    written = sum(count for count, _ in gathered)
    print(summary_line(written, plan.already_done, len(failed), time.monotonic() - started, world_size), flush=True)
    return SOME_SKIPPED if failed else 0
