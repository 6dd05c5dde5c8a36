"""Rows that survive a timeout: each one appended to ``gpu.jsonl`` as it is measured, and a readable ``gpu.md``.

A device lease ends when its time is up, whatever is still running; a table written at the end would then be lost
with every row before it. So each row is one flushed and fsynced JSON line, printed too, and the Markdown table is
rewritten whole after each row (two files: a device machine returns only a few).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from ..files import atomic_write

COLUMNS = {  # JSON key -> Markdown column
    "row": "check",
    "ms": "ms",
    "tflops": "TFLOP/s",
    "mfu_datasheet": "of datasheet peak",
    "mfu_conv": "of conv3d peak",
    "peak_gib": "peak GiB",
    "rate": "per s",
    "result": "result",
}


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


class RowRecorder:
    """Appends rows to ``out/gpu.jsonl`` (after a header line) and keeps ``out/gpu.md`` in step with it."""

    def __init__(self, out: Path, title: str, header: dict[str, Any]):
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.markdown = out / "gpu.jsonl", out / "gpu.md"
        self.title, self.rows = title, []
        self.console = Console(highlight=False, soft_wrap=True)
        self.append({"header": header})
        self.console.print(f"[bold]{title}[/]\nrows go to {self.jsonl} and {self.markdown} as they are measured")

    def append(self, record: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def add(self, row: dict[str, Any]) -> None:
        """Record one measured row: on disk first, then on the console."""
        self.rows.append(row)
        self.append(row)
        atomic_write(self.markdown, lambda tmp: Path(tmp).write_text(self.table()))
        shown = "  ".join(f"{COLUMNS[k]} {cell(row[k])}" for k in COLUMNS if k != "row" and row.get(k) is not None)
        self.console.print(f"{row['row']}: {shown}")

    def table(self) -> str:
        used = [key for key in COLUMNS if any(row.get(key) is not None for row in self.rows)]
        lines = [f"# {self.title}", "", "| " + " | ".join(COLUMNS[k] for k in used) + " |"]
        lines.append("|" + "|".join("---" if k in ("row", "result") else "---:" for k in used) + "|")
        lines += ["| " + " | ".join(cell(row.get(k)) for k in used) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"
