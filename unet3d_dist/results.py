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
    """One row per (class, metric): mean, std (population), median, defined count and undefined count."""
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
                }
            )
    return rows


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
