"""The planning rules: each turns the fingerprint (and what this machine measured) into one setting and a reason.

They follow nnU-Net's published heuristics where it has one: the median spacing, and for anisotropic data the 10th
percentile along the coarse axis; CT clipped to its foreground's 0.5-99.5 percentiles, other modalities z-scored
per scan (inside the nonzero region when the background is zero); the crop started at the median scan and shrunk
along its longest side in mm until it fits; a batch of 2. Where ours differ the reason says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..components import ONE_PIECE
from ..config import MAX_LEVELS, MIN_LEVELS, side_divisor

ANISOTROPY = 3.0  # nnU-Net: a spacing ratio above this marks an anisotropic data set
# The crop should cover at least this share of the median scan, else the spacing coarsens. nnU-Net's low-resolution
# stage uses a quarter; at equal compute our left-atrium plan at a quarter scored 0.03 lower Dice and 10 voxels higher
# HD95 than the hand-written recipe, whose crops cover 53 % (docs/RESULTS.md).
LOW_RES_SHARE = 0.5
MIN_SIDE = 16  # voxels: a 3-level network's bottleneck then still has 4 per side
SIDE_STEP = side_divisor(4)  # crop sides start as multiples of the default 4-level network's divisor
BOTTLENECK_SIDE = 4  # nnU-Net halves a side while the bottleneck keeps at least this many voxels along it
FIRST_WIDTH, MAX_WIDTH = 16, 320  # channels double per level from 16, capped at nnU-Net's 320


@dataclass(frozen=True)
class Choice:
    setting: str
    value: Any
    reason: str


def target_spacing(fingerprint: dict[str, Any], max_voxels: float) -> Choice:
    """Median spacing (the coarse axis at its 10th percentile when anisotropic), coarsened isotropically when the
    largest crop that fits would see under LOW_RES_SHARE of the median scan (nnU-Net's low-resolution stage)."""
    median = fingerprint["spacing"]["median"]
    spacing, reason = list(median), "the median spacing"
    if max(median) / min(median) > ANISOTROPY:
        coarse = median.index(max(median))
        spacing[coarse] = fingerprint["spacing"]["p10"][coarse]
        reason = f"median in-plane; axis {'xyz'[coarse]} at its 10th percentile (anisotropic, ratio > {ANISOTROPY:g})"
    extent = fingerprint["extent_mm_median"]
    voxels = math.prod(e / s for e, s in zip(extent, spacing))
    max_voxels = max(max_voxels, MIN_SIDE**3)  # the smallest crop the network takes, whatever the budget
    if voxels * LOW_RES_SHARE > max_voxels:
        factor = (voxels * LOW_RES_SHARE / max_voxels) ** (1 / 3)
        spacing = [s * factor for s in spacing]
        reason += (
            f", coarsened {factor:.2f}x so that the largest crop this budget allows covers {LOW_RES_SHARE:.0%} of the "
            'median scan (a quarter cost 0.03 Dice: docs/RESULTS.md, "The planned left atrium")'
        )
    return Choice("preprocessing.spacing", [round(s, 3) for s in spacing], reason)


def deep_supervision() -> Choice:
    """On, as in nnU-Net; the hand-written left-atrium recipe that the plan is checked against uses it too."""
    return Choice("model.deep_supervision", True, "nnU-Net's default: the loss also at 1/2 and 1/4 resolution")


def normalization(fingerprint: dict[str, Any], modality: str) -> Choice:
    """Per channel: CT clipped to the foreground's 0.5-99.5 percentiles; otherwise z-score per scan."""
    specs, reasons = {}, []
    for name, stats in fingerprint["channels"].items():
        if modality.upper() == "CT":
            # No labelled voxel in any case (only empty labels): the whole scans' percentiles instead.
            where = "foreground" if not math.isnan(stats["foreground_percentiles"]["0.5"]) else "whole scans"
            percentiles = stats["foreground_percentiles" if where == "foreground" else "whole_percentiles"]
            low, high = (round(percentiles[p], 1) for p in ("0.5", "99.5"))
            specs[name] = {"kind": "ct_window", "window": [low, high]}
            reasons.append(f"{name}: CT, clipped to the 0.5-99.5 percentiles of the {where}: [{low:g}, {high:g}] HU")
        else:
            nonzero = stats["zero_share"] > 0.25
            specs[name] = {"kind": "zscore", "nonzero": nonzero}
            where = "inside the nonzero region (a masked background)" if nonzero else "over the whole scan"
            reasons.append(f"{name}: {modality}, z-score per scan {where}")
    value = next(iter(specs.values())) if len(specs) == 1 else specs
    return Choice("preprocessing.normalization", value, "; ".join(reasons))


def crop_shape(median_shape: list[float], spacing: list[float], max_voxels: float) -> Choice:
    """The median scan (in voxels at the target spacing, rounded up to multiples of 8), shrunk by 8 voxels along its
    longest side in mm until it holds at most ``max_voxels``. Of equally long sides, the one that covers the most of
    the scan shrinks first, so that a crop does not pad a short side while it misses most of a long one."""
    crop = [max(MIN_SIDE, SIDE_STEP * math.ceil(n / SIDE_STEP)) for n in median_shape]
    while math.prod(crop) > max_voxels:
        shrinkable = [i for i in range(3) if crop[i] > MIN_SIDE]
        if not shrinkable:
            break
        longest = max(shrinkable, key=lambda i: (crop[i] * spacing[i], crop[i] / median_shape[i]))
        crop[longest] -= SIDE_STEP
    whole = all(c >= n for c, n in zip(crop, median_shape))
    reason = (
        "the whole median scan"
        if whole
        else f"the median scan ({'x'.join(str(round(n)) for n in median_shape)}) shrunk along its longest side in mm "
        f"to fit the budget ({max_voxels / 1e3:.0f} k voxels)"
    )
    return Choice("data.crop", crop, reason)


def foreground_fraction() -> Choice:
    """Half the crops centred on a class, not nnU-Net's third: a plan trains thousands of steps, not 250,000."""
    return Choice(
        "data.foreground_fraction",
        0.5,
        "half the crops centred on a class (nnU-Net's 1/3 cost the planned left atrium 0.010 Dice and 2.2 voxels "
        'of HD95 in 1,700 steps: docs/RESULTS.md, "The planned left atrium")',
    )


def body_crop(modality: str) -> Choice:
    """CT scans hold air around the body that crops would waste; prepare crops it away, and the fingerprint is taken
    inside the same box so that its shapes describe what training sees."""
    if modality.upper() == "CT":
        crop = {"to": "body", "threshold": -500, "margin_mm": 10}
        return Choice("preprocessing.crop", crop, "CT: crop the air around the body (HU above -500, 10 mm margin)")
    return Choice("preprocessing.crop", {"to": "none"}, "whole scans")


def largest_component(fingerprint: dict[str, Any]) -> Choice:
    """Keep only each class's largest predicted piece when every class is one piece in the labels. nnU-Net decides
    this after its cross-validation; the labels already say it, and it removes the stray islands that dominate HD95."""
    held = {n: c["largest_piece_share_p10"] for n, c in fingerprint["classes"].items() if c["share_of_cases"] > 0}
    if not held:
        return Choice("inference.largest_component", False, "no labelled class")
    split = [name for name, share in held.items() if share < ONE_PIECE]
    if split:
        named = ", ".join(split[:3]) + (" and others" if len(split) > 3 else "")
        return Choice("inference.largest_component", False, f"{named}: several pieces in more than 1 case of 10")
    name = min(held, key=held.get)
    return Choice(
        "inference.largest_component",
        True,
        f"every class is one piece: its largest holds {math.floor(held[name] * 1000) / 10:g} % of it or more in 9 "
        f"of 10 cases ({name}, the least whole)",
    )


def network_depth(crop: list[int], spacing: list[float]) -> Choice:
    """The most levels (3 to 6) whose halvings keep at least 4 voxels on every side of the bottleneck, as nnU-Net
    does per axis (our network halves all sides together, so the shortest side decides); widths double per level."""
    levels = MIN_LEVELS
    while levels < MAX_LEVELS and all(
        c % side_divisor(levels + 1) == 0 and c // side_divisor(levels + 1) >= BOTTLENECK_SIDE for c in crop
    ):
        levels += 1
    step = side_divisor(levels)
    widths = [min(FIRST_WIDTH * 2**i, MAX_WIDTH) for i in range(levels)]
    cells = "x".join(str(c // step) for c in crop)
    mm = "x".join(f"{step * s:.3g}" for s in spacing)
    more = "the network's limit" if levels == MAX_LEVELS else "one more halving would leave under 4 (or split a voxel)"
    return Choice(
        "model.widths",
        widths,
        f"{levels} levels: the bottleneck sees the whole crop as {cells} cells of {mm} mm; {more}",
    )


def augmentation(spacing: list[float]) -> list[Choice]:
    """Rotations only on (nearly) isotropic grids, since they rotate in voxel space; scaling and intensity always."""
    isotropic = max(spacing) / min(spacing) <= 1.5
    rotate = 15.0 if isotropic else 0.0
    why = "isotropic grid" if isotropic else "anisotropic grid: a voxel-space rotation would shear"
    table = 'docs/RESULTS.md, "nnU-Net\'s spatial augmentation at 4,000 steps"'
    wider = f"its ranges on half the crops cost the left atrium 0.029 Dice at 4,000 steps ({table})"
    return [
        Choice("data.rotate_deg", rotate, f"{why}; half nnU-Net's 30 degrees ({table})" if isotropic else why),
        Choice("data.scale", 0.15, f"zoom [0.85, 1.15], half nnU-Net's 30 %: {wider}"),
        Choice("data.intensity_aug", True, "brightness, contrast, gamma and noise per channel"),
        Choice("data.flip_axes", "yz", "the prepared data are LPS: x flips would swap left and right organs"),
    ]
