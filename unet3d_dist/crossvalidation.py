"""Cross-validation: each fold trained and scored on its held-out cases, then pooled (``unet3d_dist.crossval``).

For each fold it trains ``<run_name>-fold<k>`` (``data.folds``/``data.fold``; under torchrun when ``--nproc`` > 1,
which defaults to the visible GPUs) and evaluates that run's last checkpoint on the fold's held-out cases. The last
checkpoint, not ``best.pt``: best.pt is chosen by Dice on those very cases, which would leak them into the score.
Finished folds are skipped, so rerunning the command resumes. The pooled per-case table goes to
``runs/<run_name>-cv/``: ``summary.json`` and ``summary.md`` (per fold and pooled, in mm and in voxels). At the end
it prints the commands that predict new scans with the fold ensemble and score it on the test split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .checkpoint import Checkpointer
from .config import Config, ConfigError, load_config
from .dist import torchrun_command
from .results import METRIC_COLUMNS, summarize


def run(command: list[str]) -> None:
    """Run one step (a fold's training or evaluation); when it fails, it has said why, and its exit code is ours:
    2 for bad input, 75 after a stop (the same crossval command resumes)."""
    print("+ " + " ".join(command), flush=True)
    code = subprocess.run(command).returncode
    if code:
        sys.exit(code)


def launcher(nproc: int) -> list[str]:
    """This Python, under torchrun when more than one process is asked for."""
    return [sys.executable] if nproc == 1 else torchrun_command(nproc)


def train_fold(args: argparse.Namespace, fold: int, run_name: str) -> None:
    run(
        [
            *launcher(args.nproc),
            "-m",
            "unet3d_dist.train",
            "--config",
            str(args.config),
            *args.overrides,
            f"data.folds={args.folds}",
            f"data.fold={fold}",
            f"log.run_name={run_name}",
        ]
    )


def evaluate_fold(args: argparse.Namespace, checkpoint: Path, out: Path) -> None:
    data = ["--data", args.eval_data] if args.eval_data else []
    run(
        [
            *launcher(args.nproc),
            "-m",
            "unet3d_dist.evaluate",
            "--checkpoint",
            str(checkpoint),
            "--split",
            "val",
            "--out",
            str(out),
            *data,
        ]
    )


def summary_table(per_fold: dict[int, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], str]:
    """Rows of mean/std/median per fold and pooled, and the same as a markdown table."""
    rows = []
    groups = [(f"fold {k}", records) for k, records in sorted(per_fold.items())]
    groups.append(("pooled", [r for records in per_fold.values() for r in records]))
    lines = ["| cases | class | " + " | ".join(METRIC_COLUMNS) + " |", "|---|---|" + "---:|" * len(METRIC_COLUMNS)]
    for name, records in groups:
        stats = {(s["class"], s["metric"]): s for s in summarize(records)}
        for cls in sorted({r["class"] for r in records}):
            row = {"group": name, "class": cls, "cases": len({r["case"] for r in records if r["class"] == cls})}
            cells = []
            for metric in METRIC_COLUMNS:
                s = stats.get((cls, metric))
                row[metric] = None if s is None else {"mean": s["mean"], "std": s["std"], "median": s["median"]}
                cells.append("–" if s is None else f"{s['mean']:.4g} ± {s['std']:.2g}")
            rows.append(row)
            lines.append(f"| {name} ({row['cases']}) | {cls} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines) + "\n"


def crossval(args: argparse.Namespace) -> None:
    """Train and score the folds that have no results yet, then pool every fold's results into one table."""
    cfg = load_config(args.config, args.overrides)
    if args.folds < 2:
        raise ConfigError(f"--folds must be at least 2, not {args.folds}")
    cv_dir = Path(cfg.log.runs_dir) / f"{cfg.log.run_name}-cv"
    per_fold: dict[int, list[dict[str, Any]]] = {}
    for fold in args.only or range(args.folds):
        run_name = f"{cfg.log.run_name}-fold{fold}"
        out = cv_dir / f"fold{fold}"
        if not (out / "results.json").exists():
            train_fold(args, fold, run_name)
            evaluate_fold(args, last_checkpoint(cfg, fold), out)
    for results in sorted(cv_dir.glob("fold*/results.json")):
        per_fold[int(results.parent.name[4:])] = json.loads(results.read_text())["cases"]
    rows, markdown = summary_table(per_fold)
    (cv_dir / "summary.json").write_text(
        json.dumps({"config": str(args.config), "folds": args.folds, "rows": rows}, indent=1)
    )
    (cv_dir / "summary.md").write_text(markdown)
    print(markdown)
    print(f"wrote {cv_dir / 'summary.md'} and {cv_dir / 'summary.json'}")
    members = [last_checkpoint(cfg, fold) for fold in range(args.folds)]
    if all(members):
        print(ensemble_commands(members, cv_dir))


def last_checkpoint(cfg: Config, fold: int) -> Path | None:
    """The fold run's last checkpoint: what the fold is scored with and what the ensemble is made of."""
    return Checkpointer(Path(cfg.log.runs_dir) / f"{cfg.log.run_name}-fold{fold}", 1).latest()


def ensemble_commands(members: list[Path], cv_dir: Path) -> str:
    """How to use the folds as one model: each fold's last checkpoint, their softmax averaged."""
    flags = " ".join(f"--checkpoint {path}" for path in members)
    return (
        f"the {len(members)}-fold ensemble (each fold's last checkpoint):\n"
        f"  predict new scans: python -m unet3d_dist.predict {flags} SCAN... --out {cv_dir / 'predictions'}\n"
        f"  score it on cases no fold trained on: python -m unet3d_dist.evaluate {flags} --split test "
        f"--out {cv_dir / 'ensemble-test'}"
    )
