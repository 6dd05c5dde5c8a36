"""Per-volume metric records as files and summaries: CSV, JSON, and mean ± std / median per class and metric.

Undefined values (surface distances with an empty mask) are NaN in memory, ``nan`` in the CSV and ``null`` in the
JSON, and are left out of means and medians; the summary's ``undefined`` counts them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write, atomic_write_text
from .metrics import DISTANCE_COLUMNS, SCORE_COLUMNS

METRIC_COLUMNS = SCORE_COLUMNS + DISTANCE_COLUMNS


def metric_columns(records: list[dict[str, Any]]) -> list[str]:
    """The metrics these records carry (distances only when they were computed)."""
    return [c for c in METRIC_COLUMNS if records and c in records[0]]


def defined(values: list[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[~np.isnan(array)]


def mean_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of every metric over all (case, class) records, for validation logs; NaN where none is defined."""
    means = {}
    for column in metric_columns(records):
        values = defined([r[column] for r in records])
        means[column] = float(values.mean()) if values.size else math.nan
    return means


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (class, metric): mean, std (population), median, defined count, undefined count, and the number
    of cases whose reference lacks the class (their Dice is 1 or 0: nothing to find)."""
    rows = []
    classes = list(dict.fromkeys(r["class"] for r in records))
    for cls in classes:
        mine = [r for r in records if r["class"] == cls]
        for column in metric_columns(records):
            values = defined([r[column] for r in mine])
            stats = (values.mean(), values.std(), np.median(values)) if values.size else (math.nan,) * 3
            rows.append(
                {
                    "class": cls,
                    "metric": column,
                    **{name: float(v) for name, v in zip(("mean", "std", "median"), stats)},
                    "n": int(values.size),
                    "undefined": len(mine) - int(values.size),
                    "absent": sum(r["empty"] in ("reference", "both") for r in mine),
                }
            )
    return rows


CONSOLE_METRICS = ("dice", "jaccard", "asd_mm", "hd95_mm", "hd_mm")  # the voxel units stay in the CSV and JSON


def class_table(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The summary as one console row per class (mean ± std of each metric), so that 10+ classes stay readable;
    with several classes a last row gives the mean over the classes that some reference holds, as multi-organ
    papers report it (a class no case holds would add a Dice of 1 for finding nothing)."""
    stats = {(row["class"], row["metric"]): row for row in summary}
    metrics = [m for m in CONSOLE_METRICS if any(metric == m for _, metric in stats)]
    classes = list(dict.fromkeys(row["class"] for row in summary))
    first = {c: stats[c, metrics[0]] for c in classes}
    cases = {c: first[c]["n"] + first[c]["undefined"] for c in classes}
    rows = []
    for cls in classes:
        mine = [stats[cls, m] for m in metrics]
        undefined = max(row["undefined"] for row in mine)
        rows.append([cls, *(cell(row) for row in mine), str(cases[cls]), str(undefined)])
    held = [c for c in classes if first[c]["absent"] < cases[c]]
    if len(held) > 1:
        means = [[stats[c, m]["mean"] for c in held if stats[c, m]["n"]] for m in metrics]
        absent = [c for c in classes if c not in held]
        name = f"mean of {len(held)} classes" + (f" (no case holds {', '.join(absent)})" if absent else "")
        rows.append([name, *(f"{np.mean(v):.4g}" if v else "-" for v in means), "", ""])
    return ["class", *metrics, "cases", "undefined"], rows


def cell(row: dict[str, Any]) -> str:
    """Mean ± std of one summary row to 4 significant digits; the mean alone for one case; '-' for none."""
    if not row["n"]:
        return "-"
    return f"{row['mean']:.4g}" if row["n"] == 1 else f"{row['mean']:.4g} ± {row['std']:.2g}"


def json_ready(value: Any) -> Any:
    """NaN becomes None (JSON null) and a Path its text, anywhere in nested dicts and lists."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(json_ready(payload), indent=1, allow_nan=False)
    atomic_write_text(path, text + "\n")


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for record in records for key in record))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, columns)
            writer.writeheader()
            writer.writerows(records)

    atomic_write(path, write)
