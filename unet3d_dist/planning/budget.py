"""The whole budget: how many training steps ``--minutes`` buys, and what they train, one model on every case or a
k-fold ensemble, with the crop they afford. Each reason names the table of docs/RESULTS.md behind it.

Budgets are counted in reference steps: one training step of 2 crops of 64x64x40 through the default network, the
left-atrium CPU recipe's step. A step of another crop or network costs its forward FLOPs over the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError
from .rules import Choice

REFERENCE_CROP = (64, 64, 40)
REFERENCE_BATCH = 2
FOLDS = 5
# Share of a run's wall time spent in training steps; the rest is start-up, validation, checkpoints and scoring.
# A 4,000-step left-atrium fold spent 97 % of its 21 min 19 s in steps (1,244 s by its logged crops/s) with one
# validation; 0.9 leaves room for validating every few epochs and for slower disks.
STEP_SHARE = 0.9
# Fewer steps than this and the crop shrinks instead: the left atrium lost 0.033 Dice at 1,000 of 2,000 steps, on all
# 14 cases (docs/RESULTS.md, "Dice against training steps"), and 0.10 at 600.
MIN_STEPS = 2000
# The longest schedule a fold was measured at, where Dice still rose: 4,000 steps gave more than 2,000 and 2,000
# more than 1,000 (docs/RESULTS.md, "Dice against training steps").
MEASURED_STEPS = 4000

Final = Literal["auto", "all", "folds"]
ONE_MODEL = "one model on every case (train)"
ENSEMBLE = f"{FOLDS}-fold ensemble (crossval)"


@dataclass(frozen=True)
class Budget:
    runs: int  # 1 (one model on every case) or FOLDS
    run_steps: float  # reference steps each run may spend
    crop_voxels: float  # the largest crop the run's time affords
    crop_reason: str
    final: Choice


def reference_steps(minutes: float, reference_s: float, where: str) -> tuple[float, Choice]:
    """The budget in reference steps: ``minutes`` of wall time, STEP_SHARE of it in steps of ``reference_s``."""
    steps = minutes * 60 * STEP_SHARE / reference_s
    reason = (
        f"{minutes:g} min for the whole model, {STEP_SHARE:.0%} of it in training steps, at {reference_s:.3f} s per "
        f"step of {REFERENCE_BATCH} crops of {'x'.join(map(str, REFERENCE_CROP))} ({where})"
    )
    return steps, Choice("budget", f"{steps:,.0f} reference steps", reason)


def final_model(steps: float, cases: int, asked: Final) -> tuple[int, Choice]:
    """One model on every case, until the budget gives each of FOLDS folds the longest schedule measured to pay;
    then the fold ensemble. ``asked`` other than auto overrides."""
    if asked == "folds" and cases < FOLDS:
        raise ConfigError(f"--final folds needs at least {FOLDS} cases for {FOLDS} folds; the input has {cases}")
    if asked == "folds":
        return FOLDS, Choice("final model", ENSEMBLE, "as asked (--final folds)")
    if asked == "all":
        return 1, Choice("final model", ONE_MODEL, "as asked (--final all)")
    if steps >= FOLDS * MEASURED_STEPS and cases >= FOLDS:
        why = (
            f"the budget gives each of {FOLDS} folds the {MEASURED_STEPS:,} steps measured to pay; one model would run "
            "past the 10,000 steps measured for it, while the ensemble gained Dice on cases no member saw and its "
            'folds give a cross-validation estimate (docs/RESULTS.md, "The fold ensemble against single fold models")'
        )
        return FOLDS, Choice("final model", ENSEMBLE, why)
    why = (
        f"under {FOLDS} x {MEASURED_STEPS:,} steps (or {FOLDS} cases) a longer schedule pays more than an ensemble: "
        "at equal compute one model of 10,000 steps scored 0.908 Dice and 5.5 voxels of HD95 on 4 held-out cases, "
        'the 5-fold ensemble of 2,000-step models 0.894 and 8.1 (docs/RESULTS.md, "One model against the fold '
        'ensemble at equal compute"), as on 20 independent test cases ("Against the original project")'
    )
    return 1, Choice("final model", ONE_MODEL, why)


def crop_voxels(run_steps: float, runs: int) -> tuple[float, str]:
    """The crop a run's time affords, in voxels, and why. Steps come first: the reference crop from MIN_STEPS steps
    up to FOLDS x MEASURED_STEPS in all runs together; a smaller crop below, a larger one above."""
    reference = math.prod(REFERENCE_CROP)
    ceiling = FOLDS * MEASURED_STEPS / runs
    if run_steps < MIN_STEPS:
        return reference * run_steps / MIN_STEPS, f"a crop smaller than the reference, for {MIN_STEPS:,} steps"
    if run_steps <= ceiling:
        return reference, (
            'the reference crop: more steps paid (docs/RESULTS.md, "Dice against training steps"), larger crops did '
            'not ("1.0 mm and 2.25× larger crops")'
        )
    return reference * run_steps / ceiling, (
        f"a crop larger than the reference, for {ceiling:,.0f} steps per run: the steps measured to pay are spent "
        '(docs/RESULTS.md, "Dice against training steps")'
    )


def spend(steps: float, cases: int, asked: Final) -> Budget:
    """The final model, the reference steps of each run and the crop they afford."""
    runs, final = final_model(steps, cases, asked)
    run_steps = steps / runs
    voxels, why = crop_voxels(run_steps, runs)
    return Budget(runs, run_steps, voxels, why, final)
