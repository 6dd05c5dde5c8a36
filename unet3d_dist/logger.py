"""Run logging on rank 0: a rich console with a progress bar, ``metrics.jsonl`` and wandb.

Every method is a no-op on other ranks, so callers never branch on the rank. The wandb run id is stored in the
checkpoint, so a resumed or requeued run continues the same wandb run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .files import forget_lines_after

METRICS_FILE = "metrics.jsonl"
LOG_WIDTH = 160  # columns of console output redirected to a file


def new_run_id() -> str:
    """A wandb-compatible run id (8 lowercase hex characters)."""
    return secrets.token_hex(4)


class RunLogger:
    def __init__(self, enabled: bool, run_dir: Path, *, resumed_step: int | None = None):
        """``resumed_step``: the training step resumed from, after which logged lines are forgotten; None (evaluation,
        which may write into a folder holding a training's metrics.jsonl) leaves the file alone."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        # A log file is read in an editor, not an 80-column terminal: lines and tables of many classes stay whole.
        self.console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else LOG_WIDTH)
        self.wandb_run: Any = None
        self.progress: Progress | None = None
        self._task: Any = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resumed_step is not None:
                forget_lines_after(self.run_dir / METRICS_FILE, resumed_step)  # that work is being redone

    def start_wandb(self, mode: str, project: str, name: str, run_id: str, config: dict[str, Any]) -> None:
        if not self.enabled:
            return
        mode = os.environ.get("WANDB_MODE", mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            self.info(
                f"[yellow]wandb is not installed here, so this run logs to {METRICS_FILE} only "
                "(pip install wandb to log there too; log.wandb=disabled silences this)"
            )
            return
        self.wandb_run = wandb.init(
            project=project,
            name=name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            config=config,
            mode=mode,
            settings=wandb.Settings(silent=True, console="off"),
        )
        # wandb logs into files under the run directory: on a full disk each failed record would print a traceback
        # of its own (the command's one error line says what happened)
        logging.raiseExceptions = False

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, soft_wrap=True)  # unbroken lines, so paths and commands can be copied

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append to metrics.jsonl and wandb (scalars only here; tables and images go through log_media)."""
        if not self.enabled:
            return
        with open(self.run_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self.log_media(step, metrics)

    def log_media(self, step: int, media: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            with self._wandb_failures():
                self.wandb_run.log(media, step=step)

    @contextlib.contextmanager
    def _wandb_failures(self) -> Iterator[None]:
        """Losing wandb must stop neither training nor the checkpoint of a stop: warn and go on without it.

        Its service process can die first: Slurm signals every process of a job step, wandb's too.
        """
        try:
            yield
        except Exception as err:
            self.wandb_run = None
            self.info(f"[yellow]wandb stopped ({type(err).__name__}: {err}); logging goes on in {METRICS_FILE}")
            forget_wandb_service()

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A wandb table (wandb is only imported when a run is active)."""
        if self.enabled and self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def begin_progress(self, total: int, completed: int) -> None:
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )
        self.progress.start()
        self._task = self.progress.add_task("train", total=total, completed=completed, status="")

    def advance(self, description: str, status: str | None = None) -> None:
        """One step done; ``status`` (loss, LR, speed) is set at logging intervals.

        A live bar needs a terminal; in log files (SLURM, CI) each status becomes one plain line instead.
        """
        if self.progress is None:
            return
        fields = {"status": status} if status is not None else {}
        self.progress.update(self._task, advance=1, description=description, **fields)
        if status is not None and not self.console.is_terminal:
            task = self.progress.tasks[0]
            self.console.print(f"{description}  step {int(task.completed)}/{int(task.total)}  {status}")

    def end_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        if not self.enabled:
            return
        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="right" if column != columns[0] else "left")
        for row in rows:
            table.add_row(*[str(v) for v in row])
        self.console.print(table)

    def finish(self) -> None:
        self.end_progress()
        if self.wandb_run is None:
            return
        offline = self.wandb_run.settings.mode == "offline"
        run_dir = Path(self.wandb_run.dir).parent
        with self._wandb_failures():
            self.wandb_run.finish()
            if offline:
                self.info(f"wandb: offline run saved in {run_dir}; upload it with: wandb sync {run_dir}")
        self.wandb_run = None


def forget_wandb_service() -> None:
    """Tear down wandb's connection to its lost service now, quietly: its exit hook would otherwise try again and
    print a traceback after the run's last line. The cause was said in the line before."""
    import wandb

    with contextlib.suppress(Exception):  # the service is gone: the teardown's own failure says nothing new
        wandb.teardown()


def progress_bar(console: Console) -> Progress:
    """The bar of work over cases (prepare, plan): done of total, the case at hand, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[now]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
