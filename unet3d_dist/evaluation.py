"""Evaluation of checkpoints on whole volumes of a prepared dataset (``python -m unet3d_dist.evaluate``).

Several checkpoints (the folds of a cross-validation, say) are evaluated as one ensemble (``segmenter.py``): their
softmax probabilities, each after its own flip averaging and at its own spacing, are averaged before the argmax.

The same code runs under ``torchrun --nproc_per_node=N``: each rank predicts and scores its own volumes, and
writes into ``--out`` (default ``<run dir>/eval-<split>/``, for an ensemble ``<runs dir>/ensemble-eval-<split>/``):

- ``results.csv`` and ``results.json``: one record per (case, foreground class); the JSON adds the summary.
- ``masks/<case>.nii.gz`` (or ``.h5``): predicted label maps with the scan's spacing, origin and direction (each
  rank writes its own cases').
- ``panels/<case>.png``: sagittal, coronal and axial slices for every case, or the ``--panels`` worst by Dice.

The folder says how far an evaluation got. Before any other output, rank 0 writes ``unfinished.txt`` there and
clears the outputs above; ``results.json`` is written last and ``unfinished.txt`` is then removed. So a folder
with ``results.json`` holds a finished evaluation, and one with ``unfinished.txt`` an interrupted one, which a rerun
starts over (as cross-validation does for its folds, and Slurm for a requeued job). Any other non-empty folder, a
finished evaluation included, is refused on every rank before the process group starts, unless ``--overwrite``.
Rank 0 holds the folder (``run.lock``, run_lock.py) from before the marker until it exits, so a second evaluation
into it is refused naming the first.
"""

from __future__ import annotations

import argparse
import functools
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, default_output
from .config import Config, ConfigError
from .data.shards import DatasetError, ShardedDataset
from .data.source import open_dataset
from .data.splits import run_cases
from .dist import default_workers, on_main, runtime
from .files import OutputError, atomic_write, atomic_write_text
from .logger import RunLogger, new_run_id
from .masks import load_mask, mask_path
from .optional import require
from .precision import amp_name
from .report import slice_panel
from .results import class_table, json_ready, metric_columns, summarize, write_csv, write_json
from .run_lock import LOCK_FILE, hold_out
from .scoring import ScoringOptions, default_metric_workers, score_cases
from .segmenter import Segmenter, describe, read_checkpoints

RESULTS_JSON = "results.json"
UNFINISHED = "unfinished.txt"
OUTPUTS = (RESULTS_JSON, "results.csv", "masks/", "panels/")  # what a run clears first; results.json first of all
REPLACED = f"{', '.join(OUTPUTS[:-1])} and {OUTPUTS[-1]}"


def check_arguments(args: argparse.Namespace, out: Path) -> None:
    if args.mask_format == "nifti":  # before any work, not at the first mask
        require("SimpleITK", "--mask-format nifti (use --mask-format hdf5 without it)", "SimpleITK")
    check_out(out, args.overwrite)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a file, a finished evaluation or a folder of other files as ``--out``, unless
    ``overwrite``; a folder this command left unfinished is taken up again."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out (nothing was changed)")
    if overwrite or not out.exists():
        return
    if (out / RESULTS_JSON).exists():
        raise ConfigError(
            f"{out} already holds a finished evaluation ({RESULTS_JSON}); pass --overwrite to replace it, or "
            "choose another --out"
        )
    entries = sorted(path for path in out.iterdir() if path.name != LOCK_FILE)
    if entries and not (out / UNFINISHED).is_file():
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        raise ConfigError(
            f"--out {out} is not empty and is not an unfinished evaluation (it holds {entries[0].name}{more}); "
            f"choose another --out, or pass --overwrite to replace {REPLACED} in it (nothing was changed)"
        )


def claim_out(out: Path, args: argparse.Namespace) -> None:
    """Rank 0, before any other output: hold ``out`` for this process (run_lock; refused if another job has it or it
    cannot be written), check it again now that no one else can change it, mark it as this command's unfinished
    output, then clear what an earlier run left, so the folder never mixes two evaluations."""
    hold_out(out)  # held until this process ends
    check_out(out, args.overwrite)
    note = (
        f"unet3d-evaluate of {' '.join(map(str, args.checkpoint))} on split {args.split!r} is writing this folder; "
        f"this file is removed once {RESULTS_JSON} is written. If that run stopped, rerun it to finish.\n"
    )
    atomic_write_text(out / UNFINISHED, note)
    for path in (out / name for name in OUTPUTS):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def check_dataset(dataset: ShardedDataset, split: str, checkpoint: Checkpoint, cfg: Config) -> list[str]:
    """The split's case ids, once the dataset is known to have the checkpoint's classes.

    For a checkpoint trained on one fold of a cross-validation (data.folds > 0), 'val' is that fold's held-out cases.
    """
    if dataset.classes != checkpoint.classes:
        raise DatasetError(
            f"dataset {dataset.root} has classes {dataset.classes} but checkpoint {checkpoint.path} was trained on "
            f"{checkpoint.classes}; pass --data with a dataset of the same classes"
        )
    case_ids = run_cases(dataset, cfg.data, "val") if split == "val" and cfg.data.folds else dataset.case_ids(split)
    if not case_ids:
        raise DatasetError(
            f"dataset {dataset.root} has no cases in split {split!r}; its splits are: {', '.join(dataset.splits())}"
        )
    return case_ids


def draw_panels(
    records: list[dict[str, Any]], dataset: ShardedDataset, options: ScoringOptions, folder: Path, count: int
) -> None:
    """Slice pictures of the ``count`` cases with the lowest mean Dice (all of them when there are no more)."""
    by_case: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_case.setdefault(record["case"], []).append(record)
    worst = sorted(by_case, key=lambda c: (sum(r["dice"] for r in by_case[c]) / len(by_case[c]), c))[:count]
    folder.mkdir(parents=True, exist_ok=True)
    for case_id in worst:
        mine = by_case[case_id]
        prediction = load_mask(mask_path(options.masks_dir, case_id, options.mask_format))
        spacing = tuple(dataset.records[case_id]["spacing"])
        if len(dataset.classes) > 2:  # per-class scores go into the legend, the title gives their mean
            dice = {r["class"]: r["dice"] for r in mine}
            names = [dataset.classes[0], *(f"{c} (Dice {dice[c]:.3f})" for c in dataset.classes[1:])]
            title = f"{case_id}  mean Dice {sum(dice.values()) / len(dice):.3f} over {len(dice)} classes"
        else:
            names = None
            title = f"{case_id}  " + "; ".join(
                f"{r['class']}: Dice {r['dice']:.3f}"
                + (f", HD95 {r['hd95_mm']:.1f} mm" if r["empty"] == "none" else f", {r['empty']} empty")
                for r in mine
            )
        draw = functools.partial(
            slice_panel,
            dataset.image(case_id)[0],
            dataset.label(case_id),
            prediction,
            spacing,
            title=title + (f"  ({dataset.channels[0]} channel shown)" if len(dataset.channels) > 1 else ""),
            classes=names,
        )
        atomic_write(folder / f"{case_id}.png", draw)


@dataclass(frozen=True)
class Request:
    """What was evaluated and where it goes: recorded in results.json and in the wandb run's config."""

    checkpoints: list[Path]
    dataset: Path
    split: str
    out: Path
    panels: int
    largest_component: bool  # whether each class's largest connected component alone was kept


def write_outputs(
    records: list[dict[str, Any]],
    dataset: ShardedDataset,
    options: ScoringOptions,
    request: Request,
    cfg: Config,
    wandb_mode: str,
    logger: RunLogger,
) -> None:
    """Rank 0: panels, CSV, summary table, wandb, and the JSON last; only then is the folder no longer unfinished."""
    out, split = request.out, request.split
    summary = summarize(records)
    if request.panels > 0:
        draw_panels(records, dataset, options, out / "panels", request.panels)
    write_csv(out / "results.csv", records)
    logger.table(f"{split}: {len({r['case'] for r in records})} cases", *class_table(summary))
    record = json_ready(asdict(request))
    logger.start_wandb(wandb_mode, cfg.log.wandb_project, f"{cfg.log.run_name}-eval-{split}", new_run_id(), record)
    columns = list(records[0])
    logger.log_table(0, f"eval/{split}/cases", columns, [[json_ready(r.get(c)) for c in columns] for r in records])
    logger.log_media(0, {f"eval/{split}/{row['class']}/{row['metric']}": row["mean"] for row in summary})
    logger.finish()
    write_json(out / RESULTS_JSON, {**record, "metrics": metric_columns(records), "summary": summary, "cases": records})
    (out / UNFINISHED).unlink()
    panels = f"; slice panels in {out / 'panels'}" if request.panels > 0 else ""
    logger.info(
        f"[bold green]done[/]: {len(records)} records in {out / 'results.csv'} and {out / RESULTS_JSON}; masks in "
        f"{out / 'masks'}{panels}"
    )


def check_ensemble_split(loaded: list[Checkpoint], split: str) -> None:
    """A fold's 'val' cases are the other folds' training cases: an ensemble of folds scored there would be scored
    on what its members learnt from."""
    folds = [item.path for item in loaded if item.cfg.data.folds]
    if len(loaded) > 1 and split == "val" and folds:
        raise ConfigError(
            f"--split val of cross-validation checkpoints such as {folds[0]} is one fold's held-out cases, which the "
            "other members trained on; evaluate an ensemble on cases none of its members saw (--split test)"
        )


def evaluate(args: argparse.Namespace) -> None:
    """The evaluate command's run, in this process's place in the job: checks first, then every rank scores its
    cases and rank 0 writes the outputs (``args`` as ``unet3d_dist.evaluate`` parses them)."""
    loaded = read_checkpoints(args.checkpoint)
    cfg = loaded[0].cfg
    if args.data:
        cfg.data.dataset = args.data
    out = args.out or default_output(args.checkpoint, f"eval-{args.split}")
    check_arguments(args, out)
    check_ensemble_split(loaded, args.split)
    with runtime(args.device) as env:
        segmenter = Segmenter.from_checkpoints(loaded, env.device, args)
        dataset = open_dataset(cfg.data, env)
        case_ids = check_dataset(dataset, args.split, loaded[0], cfg)
        on_main(env, functools.partial(claim_out, out, args), (ConfigError, OutputError))  # before any rank writes
        options = ScoringOptions(
            distances=True,
            metric_workers=args.workers if args.workers >= 0 else default_metric_workers(default_workers(env)),
            masks_dir=out / "masks",
            mask_format=args.mask_format,
        )
        logger = RunLogger(env.is_main, out)
        settings = segmenter.settings
        patches = sorted({"x".join(map(str, member.patch)) for member in segmenter.members})
        logger.info(
            f"[bold]unet3d-evaluate[/] {describe(args.checkpoint)} on {len(case_ids)} {args.split!r} cases of "
            f"{dataset.root}  world={env.world_size}  device={env.device.type}  patch={','.join(patches)}  "
            f"overlap={settings.overlap}  amp={amp_name(settings.amp_dtype)}  largest component="
            f"{'yes' if settings.largest_component else 'no'}  metric workers/rank={options.metric_workers}"
        )
        records = score_cases(segmenter, dataset, case_ids, env, options)
        if records is not None:
            request = Request(args.checkpoint, dataset.root, args.split, out, args.panels, settings.largest_component)
            write_outputs(records, dataset, options, request, cfg, args.wandb or cfg.log.wandb, logger)
