"""A record of the crops every step trains (``log.crop_keys``), to check a run's data order across restarts.

Each rank appends one line per micro-batch to ``crop_keys/rank-<r>.jsonl``: the global step, the group (its place
in the step's global batch) and the (epoch, index) keys of its crops, which the DataLoader delivers in its
sampler's order. A resumed run first forgets the lines of steps after its checkpoint, as metrics.jsonl does, so
the files hold exactly the history of the final weights, whatever ranks wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import forget_lines_after

FOLDER = "crop_keys"


def forget_after(run_dir: Path, step: int) -> None:
    """Drop every rank's lines of steps after ``step`` (called by the first rank before any rank trains)."""
    for path in (run_dir / FOLDER).glob("rank-*.jsonl"):
        forget_lines_after(path, step)


class CropKeyLog:
    def __init__(self, run_dir: Path, rank: int, world_size: int):
        self.path = run_dir / FOLDER / f"rank-{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size = rank, world_size

    def add(self, step: int, micro_batches: list[list[tuple[int, int]]]) -> None:
        """The keys of this rank's micro-batches of global step ``step`` (groups rank, rank + W, ...)."""
        with open(self.path, "a") as fh:
            for i, keys in enumerate(micro_batches):
                group = self.rank + i * self.world_size
                fh.write(json.dumps({"step": step, "group": group, "keys": [list(k) for k in keys]}) + "\n")


def read_crop_keys(run_dir: Path) -> dict[int, dict[int, list[list[int]]]]:
    """{step: {group: keys}} from every rank's file."""
    steps: dict[int, dict[int, list[list[int]]]] = {}
    for path in sorted((run_dir / FOLDER).glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], {})[row["group"]] = row["keys"]
    return steps
