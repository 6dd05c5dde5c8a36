"""Our metrics against medpy's own functions on the same arrays, and the empty-mask policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from medpy.metric import binary as medpy
from scipy import ndimage

from unet3d_dist.metrics import DISTANCE_COLUMNS, case_metrics, class_metrics
from unet3d_dist.results import class_table, summarize

ANISOTROPIC = (0.7, 1.1, 3.0)


def blob(rng: np.random.Generator, shape: tuple[int, int, int], threshold: float) -> np.ndarray:
    """An irregular mask, often in several pieces: thresholded smooth noise."""
    return ndimage.gaussian_filter(rng.standard_normal(shape), 2.5) > threshold


def medpy_values(prediction: np.ndarray, reference: np.ndarray, spacing) -> dict[str, float]:
    values = {"dice": medpy.dc(prediction, reference), "jaccard": medpy.jc(prediction, reference)}
    for unit, voxelspacing in (("mm", spacing), ("vox", None)):
        values[f"asd_{unit}"] = medpy.asd(prediction, reference, voxelspacing)
        values[f"assd_{unit}"] = medpy.assd(prediction, reference, voxelspacing)
        values[f"hd95_{unit}"] = medpy.hd95(prediction, reference, voxelspacing)
        values[f"hd_{unit}"] = medpy.hd(prediction, reference, voxelspacing)
    return values


def assert_matches_medpy(prediction: np.ndarray, reference: np.ndarray, spacing) -> dict:
    ours = class_metrics(prediction, reference, spacing)
    for key, expected in medpy_values(prediction, reference, spacing).items():
        assert ours[key] == pytest.approx(expected, rel=1e-6, abs=1e-12), key
    return ours


@pytest.mark.parametrize("seed", range(4))
def test_irregular_masks_match_medpy_with_anisotropic_spacing(seed):
    rng = np.random.default_rng(seed)
    shape = (30, 26, 18)
    reference = blob(rng, shape, 0.08)
    prediction = reference ^ blob(rng, shape, 0.12)  # overlapping, with holes and islands
    ours = assert_matches_medpy(prediction, reference, ANISOTROPIC)
    assert ours["empty"] == "none" and ours["pred_voxels"] == prediction.sum() and ours["ref_voxels"] == reference.sum()
    assert ours["hd_mm"] != pytest.approx(ours["hd_vox"])  # the spacing really changed the distances


def test_objects_touching_the_volume_border_keep_medpy_surfaces():
    shape = (24, 20, 16)
    reference = np.zeros(shape, bool)
    reference[0:9, 3:20, 10:16] = True  # touches the x=0, y=max and z=max faces
    prediction = np.zeros(shape, bool)
    prediction[0:7, 5:18, 9:16] = True  # touches x=0 and z=max, not y=max
    prediction[20:24, 0:2, 0:3] = True  # an island in the opposite corner
    assert_matches_medpy(prediction, reference, ANISOTROPIC)


def test_a_mask_filling_whole_axes_matches_medpy():
    shape = (12, 10, 8)
    reference = np.zeros(shape, bool)
    reference[:, :, 2:6] = True  # a slab spanning x and y entirely: its x/y faces are surface only through the border
    prediction = np.zeros(shape, bool)
    prediction[:, 1:, 3:8] = True
    assert_matches_medpy(prediction, reference, ANISOTROPIC)


@pytest.mark.parametrize(
    ("predicted", "referenced", "empty", "dice"),
    [(False, True, "prediction", 0.0), (True, False, "reference", 0.0), (False, False, "both", 1.0)],
)
def test_empty_masks_follow_the_policy_instead_of_raising(predicted, referenced, empty, dice):
    shape = (10, 9, 8)
    box = np.zeros(shape, bool)
    box[2:6, 3:7, 1:5] = True
    prediction, reference = box & predicted, box & referenced
    with pytest.raises(RuntimeError):
        medpy.hd95(prediction, reference)  # what calling medpy directly would do
    ours = class_metrics(prediction, reference, ANISOTROPIC)
    assert ours["empty"] == empty
    assert ours["dice"] == ours["jaccard"] == dice
    if empty != "both":  # medpy gives NaN for two empty masks
        assert medpy.dc(prediction, reference) == medpy.jc(prediction, reference) == dice
    assert all(math.isnan(ours[key]) for key in DISTANCE_COLUMNS)


def test_case_metrics_gives_one_record_per_foreground_class():
    rng = np.random.default_rng(7)
    shape = (20, 18, 14)
    reference = blob(rng, shape, 0.1).astype(np.uint8) + 2 * blob(rng, shape, 0.2)
    reference[reference == 3] = 2
    prediction = reference.copy()
    prediction[prediction == 2] = 0  # class 2 missed entirely
    records = case_metrics(prediction, reference, ANISOTROPIC, ["background", "liver", "spleen"])
    assert [r["class"] for r in records] == ["liver", "spleen"]
    assert records[0]["dice"] == 1.0 and records[0]["hd_mm"] == 0.0 and records[0]["empty"] == "none"
    assert records[1]["dice"] == 0.0 and records[1]["empty"] == "prediction" and math.isnan(records[1]["hd95_mm"])
    assert "asd_mm" not in case_metrics(prediction, reference, ANISOTROPIC, ["background", "liver"], distances=False)[0]


def test_the_mean_over_classes_leaves_out_a_class_that_no_case_holds():
    """A class absent from every reference and from the prediction scores Dice 1 per case; averaging it in would
    lift the multi-organ mean, so the table's mean row names it instead."""
    classes = ["background", "liver", "spleen", "esophagus"]
    reference = np.zeros((20, 18, 14), np.uint8)
    reference[2:9, 3:12, 2:10], reference[12:18, 4:10, 3:9] = 1, 2
    prediction = np.where(reference == 2, 0, reference)  # the spleen missed: Dice 0
    records = [
        {"case": case, **r} for case in range(2) for r in case_metrics(prediction, reference, ANISOTROPIC, classes)
    ]
    header, rows = class_table(summarize(records))
    assert [row[0] for row in rows] == ["liver", "spleen", "esophagus", "mean of 2 classes (no case holds esophagus)"]
    assert rows[2][header.index("dice")] == "1 ± 0" and rows[2][header.index("undefined")] == "2"
    assert rows[-1][header.index("dice")] == "0.5"  # liver 1 and spleen 0; with the esophagus it would read 0.6667
