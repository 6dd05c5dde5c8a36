"""The synthetic CT phantom: realistic HU per tissue, one exact liver label, seeded, cached once through the shard
writer.
"""

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from unet3d_dist.data.shards import MANIFEST, ShardedDataset
from unet3d_dist.data.synthetic import HU_WINDOW, ensure_synthetic, make_phantom
from unet3d_dist.preparation.preprocess import ct_window

SHAPE = (128, 112, 96)


def phantom(case: int) -> tuple[np.ndarray, np.ndarray]:
    return make_phantom(np.random.default_rng([7, case]), SHAPE)


def share(hu: np.ndarray, low: float, high: float) -> float:
    return float(((hu >= low) & (hu <= high)).mean())


def test_tissues_have_realistic_hounsfield_units():
    for case in range(3):
        hu, liver = phantom(case)
        assert abs(np.median(hu[:8, :8, :]) + 1000) < 30  # air outside the body
        inner_liver = ndimage.binary_erosion(liver, iterations=2)
        assert 80 <= np.median(hu[inner_liver]) <= 130  # portal-venous liver, with brighter vessels
        assert share(hu, -150, -60) > 0.05  # subcutaneous and visceral fat
        assert share(hu, -950, -750) > 0.005  # lungs (and bowel gas)
        assert np.percentile(hu, 99.95) > 500  # cortical bone of spine and ribs
        assert hu.dtype == np.float32 and np.isfinite(hu).all()


def test_no_liver_voxel_looks_like_bone():
    """The label is exact: bone is painted where no organ reaches (v4 painted the spine over up to 5 % of a liver)."""
    for case in (1, 2, 5, 7):  # v4 painted 250-1,529 voxels of bone inside each of these livers
        hu, liver = make_phantom(np.random.default_rng([20240601, case]), SHAPE)
        inside = ndimage.binary_erosion(liver)  # the boundary layer shares its neighbours' partial volume
        assert (hu[inside] > 220).sum() == 0, case


def test_the_liver_is_one_irregular_randomly_placed_structure():
    centres, fractions = [], []
    for case in range(3):
        _, liver = phantom(case)
        assert liver.dtype == np.uint8 and set(np.unique(liver)) == {0, 1}
        assert ndimage.label(liver)[1] == 1
        fractions.append(liver.mean())
        centres.append(np.argwhere(liver).mean(axis=0))
        assert liver.sum() < 0.97 * ConvexHull(np.argwhere(liver)).volume  # two deformed lobes: an ellipsoid gives 1.02
    assert all(0.02 < f < 0.25 for f in fractions)
    assert np.ptp(np.array(centres), axis=0).max() > 3  # placed differently in each case


def test_same_seed_same_volume_and_different_cases_differ():
    hu_a, liver_a = phantom(0)
    hu_b, liver_b = phantom(0)
    assert np.array_equal(hu_a, hu_b) and np.array_equal(liver_a, liver_b)
    assert not np.array_equal(liver_a, phantom(1)[1])


def test_generated_once_through_the_shard_writer_with_exact_labels(tmp_path):
    root = ensure_synthetic(tmp_path, 6)
    stamp = (root / MANIFEST).stat().st_mtime_ns
    dataset = ShardedDataset(root)
    assert dataset.classes == ["background", "liver"] and dataset.checksum_note is None  # its chunks carry checksums
    assert {split: len(dataset.case_ids(split)) for split in ("train", "val", "test")} == {
        "train": 4,
        "val": 1,
        "test": 1,
    }
    case = dataset.manifest["cases"][0]
    rng = np.random.default_rng([20240601, 0])
    shape = (int(rng.integers(120, 137)), int(rng.integers(104, 121)), int(rng.integers(88, 105)))
    hu, liver = make_phantom(rng, shape)
    assert case["shape"] == list(shape) and case["spacing"] == [3.0, 3.0, 3.0]
    assert np.array_equal(dataset.label(case["id"]), liver)
    assert np.allclose(dataset.image(case["id"])[0], ct_window(hu, *HU_WINDOW))
    assert case["intensity_percentiles"] == [list(np.percentile(hu, [0.5, 99.5]))]  # raw HU, as prepare records
    train = [r["intensity_percentiles"][0] for r in dataset.manifest["cases"] if r["split"] == "train"]
    assert dataset.manifest["intensity_range"] == {"image": [min(p[0] for p in train), max(p[1] for p in train)]}
    assert (
        ensure_synthetic(tmp_path, 6) == root and (root / MANIFEST).stat().st_mtime_ns == stamp
    )  # cached, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left behind


def test_the_arterial_phase_is_a_second_channel_of_the_same_anatomy_that_tells_spleen_from_liver():
    rng_one, rng_two = np.random.default_rng([7, 3]), np.random.default_rng([7, 3])
    portal, liver = make_phantom(rng_one, SHAPE)
    both, liver_again = make_phantom(rng_two, SHAPE, phases=2)
    assert both.shape == (2, *SHAPE) and np.array_equal(liver, liver_again)
    assert np.array_equal(both[0], portal)  # the first channel is the single-channel phantom itself
    inner_liver = ndimage.binary_erosion(liver, iterations=2)
    arterial_liver, portal_liver = np.median(both[1][inner_liver]), np.median(portal[inner_liver])
    assert 55 <= arterial_liver <= 95 and portal_liver - arterial_liver > 10  # barely enhanced yet
    bright = (both[1] > 115) & (both[1] < 200) & ~ndimage.binary_dilation(liver, iterations=3)
    assert bright.sum() > 2000  # spleen and kidney cortex light up in the arterial phase


def test_a_two_channel_phantom_is_cached_beside_the_single_channel_one_and_names_its_phases(tmp_path):
    two = ShardedDataset(ensure_synthetic(tmp_path, 3, channels=2))
    assert two.channels == ["portal_venous", "arterial"] and two.root.name.endswith("-c2")
    one = ShardedDataset(ensure_synthetic(tmp_path, 3))
    assert one.channels == ["image"] and one.root != two.root
    case_id = one.case_ids()[0]
    assert two.image(case_id).shape == (2, *one.records[case_id]["shape"])
    np.testing.assert_array_equal(two.image(case_id)[0], one.image(case_id)[0])
