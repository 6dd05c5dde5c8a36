"""The left atrium's Dice-against-compute curve: per-case results of 5-fold cross-validation at several schedule
lengths, pooled per schedule, each longer schedule paired with the one before (mean +- standard error, Wilcoxon),
and a PNG with the published figures as reference lines.

    python docs/figures/la_mri_curve.py --add STEPS RUNS/la_mri_cpu_4k-cv   # append a crossval's per-case results
    python docs/figures/la_mri_curve.py                                     # print the tables, write the PNG

The per-case results live in la_mri_curve.csv next to this script, one row per schedule and case.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402

from unet3d_dist.config import load_config  # noqa: E402
from unet3d_dist.model import build_model, forward_flops  # noqa: E402

HERE = Path(__file__).parent
TABLE = HERE / "la_mri_curve.csv"
FIELDS = ["steps", "fold", "case", "dice", "jaccard", "asd_vox", "hd95_vox"]
# Published Dice on the original project's 20 test cases (docs/RESULTS.md, "Against the original project").
REFERENCES = {
    "V-Net, 80 labelled cases": 0.9114,
    "MC-Net+, 16 labelled + 64 unlabelled": 0.9107,
    "original project, 14 cases": 0.8856,
    "V-Net, 16 labelled cases": 0.8603,
}
TARGET_DICE, TARGET_HD95 = 0.90, 8.0
# One model trained on all 14 cases, scored on those 20 test cases: steps -> (Dice, HD95 in voxels).
ALL_CASES = {2000: (0.8860, 9.27), 4800: (0.9046, 7.27)}


def add(steps: int, cv_dir: Path) -> None:
    """Append the per-case results of a crossval folder (fold<k>/results.json) as the schedule ``steps``."""
    rows = read() if TABLE.exists() else []
    if any(int(r["steps"]) == steps for r in rows):
        raise SystemExit(f"{TABLE} already holds {steps} steps")
    for results in sorted(cv_dir.glob("fold*/results.json")):
        fold = results.parent.name.removeprefix("fold")
        for case in json.loads(results.read_text())["cases"]:
            rows.append({"steps": steps, "fold": fold, **{k: case[k] for k in FIELDS[2:]}})
    with TABLE.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (int(r["steps"]), r["fold"], r["case"])))


def read() -> list[dict]:
    with TABLE.open() as fh:
        return list(csv.DictReader(fh))


def step_pflop() -> float:
    """Training PFLOP of one step of the CPU recipe: 2 crops of 64x64x40, forward and a backward of twice that."""
    cfg = load_config(str(HERE.parents[1] / "configs" / "la_mri_cpu.yaml"), ["data.dataset=synthetic"])
    model = build_model(cfg.model, 1, 2)
    return 3 * cfg.train.batch_size * forward_flops(model, tuple(cfg.data.crop)) / 1e15


def by_schedule(rows: list[dict]) -> dict[int, dict[str, dict[str, float]]]:
    """steps -> case -> metric -> value, for the schedules that hold every case."""
    table: dict[int, dict[str, dict[str, float]]] = {}
    for row in rows:
        table.setdefault(int(row["steps"]), {})[row["case"]] = {k: float(row[k]) for k in FIELDS[3:]}
    cases = max(len(c) for c in table.values())
    return {steps: c for steps, c in sorted(table.items()) if len(c) == cases}


def print_tables(table: dict[int, dict[str, dict[str, float]]], pflop: float) -> None:
    print("| steps per fold | training PFLOP, 5 folds | Dice | Jaccard | ASD (vox) | HD95 (vox) | cases |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for steps, cases in table.items():
        means = {k: np.mean([c[k] for c in cases.values()]) for k in FIELDS[3:]}
        dice = f"{means['dice']:.4f} ± {np.std([c['dice'] for c in cases.values()]):.3f}"
        print(
            f"| {steps:,} | {5 * steps * pflop:.2f} | {dice} | {means['jaccard']:.4f} | {means['asd_vox']:.2f} | "
            f"{means['hd95_vox']:.2f} | {len(cases)} |"
        )
    print("\n| longer schedule | Dice gained (mean ± s.e.) | cases better | Wilcoxon p | HD95 change (vox) |")
    print("|---|---:|---:|---:|---:|")
    schedules = list(table)
    for shorter, longer in zip(schedules, schedules[1:]):
        ids = sorted(table[longer])
        gain = np.array([table[longer][c]["dice"] - table[shorter][c]["dice"] for c in ids])
        hd95 = np.array([table[longer][c]["hd95_vox"] - table[shorter][c]["hd95_vox"] for c in ids])
        p = wilcoxon(gain).pvalue
        print(
            f"| {shorter:,} → {longer:,} | {gain.mean():+.4f} ± {gain.std(ddof=1) / math.sqrt(len(gain)):.4f} | "
            f"{(gain > 0).sum()} of {len(gain)} | {p:.2g} | {hd95.mean():+.2f} ± "
            f"{hd95.std(ddof=1) / math.sqrt(len(hd95)):.2f} |"
        )


def plot(table: dict[int, dict[str, dict[str, float]]], pflop: float, out: Path) -> None:
    steps = np.array(list(table))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.6))
    for axis, metric, label, column in ((left, "dice", "Dice", 0), (right, "hd95_vox", "HD95 (voxels of 0.625 mm)", 1)):
        values = [[c[metric] for c in table[s].values()] for s in steps]
        means = np.array([np.mean(v) for v in values])
        errors = np.array([np.std(v, ddof=1) / math.sqrt(len(v)) for v in values])
        axis.errorbar(
            steps, means, yerr=errors, marker="o", capsize=4, color="black", label="ours, pooled 5-fold CV (14)"
        )
        trained = sorted(ALL_CASES)
        axis.plot(
            trained,
            [ALL_CASES[s][column] for s in trained],
            marker="s",
            color="tab:green",
            label="ours, one model on all 14, on the 20 test cases",
        )
        ticks = sorted(set(steps) | set(trained))
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [f"{s:,}" for s in ticks])
        axis.minorticks_off()
        axis.set_xlabel("training steps per model (2 crops of 64×64×40)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        flops = axis.secondary_xaxis("top", functions=(lambda s: s * pflop, lambda f: f / pflop))
        flops.set_xticks([s * pflop for s in ticks], [f"{s * pflop:.2f}" for s in ticks])
        flops.minorticks_off()
        flops.set_xlabel("training PFLOP per model")
    for (name, dice), style in zip(REFERENCES.items(), ("-", "--", "-.", ":")):
        left.axhline(dice, color="tab:blue", linestyle=style, linewidth=1, label=f"{name} (20 test cases)")
    left.axhline(TARGET_DICE, color="tab:red", linewidth=1, label="target (5-fold CV)")
    right.axhline(TARGET_HD95, color="tab:red", linewidth=1, label="target (5-fold CV)")
    right.axhline(5.75, color="tab:blue", linewidth=1, label="V-Net, 80 labelled cases (20 test cases)")
    for axis in (left, right):
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle("Left atrium, CPU recipe (1.25 mm, bf16): Dice and HD95 against the length of the schedule")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nwrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--add", nargs=2, metavar=("STEPS", "CV_DIR"), help="append a crossval folder's results")
    parser.add_argument("--out", type=Path, default=HERE / "la_mri_curve.png")
    args = parser.parse_args()
    if args.add:
        add(int(args.add[0]), Path(args.add[1]))
    pflop = step_pflop()
    table = by_schedule(read())
    print_tables(table, pflop)
    plot(table, pflop, args.out)


if __name__ == "__main__":
    main()
