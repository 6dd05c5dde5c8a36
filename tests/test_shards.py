import json

import numpy as np
import pytest
from conftest import box_case, flip_byte_in_chunk

from unet3d_dist.data.shards import DatasetError, ShardedDataset, load_manifest, verify_dataset, write_dataset


def test_round_trip_keeps_arrays_geometry_and_manifest(tmp_path):
    cases = [
        box_case(f"c{i}", (20 + i, 18, 12), np.s_[2:8, 3:9, 1:5], "train" if i < 3 else "val", i) for i in range(5)
    ]
    manifest = write_dataset(
        tmp_path, cases, ["background", "organ"], name="t", modality="CT", preprocessing={}, cases_per_shard=2
    )
    assert [s["cases"] for s in manifest["shards"]] == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    data = ShardedDataset(tmp_path)
    assert data.case_ids("val") == ["c3", "c4"] and data.num_classes == 2
    for case in cases:
        np.testing.assert_array_equal(data.image(case.id), case.image[None])  # (C, X, Y, Z)
        np.testing.assert_array_equal(data.label(case.id), case.label)
        record = data.records[case.id]
        assert record["shape"] == list(case.image.shape)
        assert record["spacing"] == [1.5, 1.0, 2.5] and record["origin"] == [10.0, -5.0, 3.0]
        assert record["class_voxels"] == [case.label.size - 144, 144]
        group = data._group(case.id)
        np.testing.assert_array_equal(group.attrs["spacing"], [1.5, 1.0, 2.5])
        assert group["image"].chunks is not None
    crop = data.image("c2", np.s_[1:5, 2:6, 3:7])
    np.testing.assert_array_equal(crop, cases[2].image[None, 1:5, 2:6, 3:7])
    fg = data.foreground("c0")
    assert len(fg) == 144 and (fg[:, 0] == 1).all()
    assert all(cases[0].label[x, y, z] == 1 for _, x, y, z in fg)
    assert verify_dataset(tmp_path) == []


def test_truncated_shard_is_refused_with_its_name(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    shard = copy / "shard-00000.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    data = ShardedDataset(copy)
    with pytest.raises(DatasetError, match="shard-00000.h5.*truncated"):
        data.image("a")
    assert any("shard-00000.h5" in p for p in verify_dataset(copy))


def test_corrupt_shard_of_the_right_size_is_refused(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    shard = copy / "shard-00001.h5"
    shard.write_bytes(bytes(shard.stat().st_size))
    with pytest.raises(DatasetError, match="shard-00001.h5.*not a readable HDF5"):
        ShardedDataset(copy).image("e")
    assert verify_dataset(copy) == [f"{shard}: sha256 differs from the manifest"]


def test_every_array_carries_chunk_checksums_and_the_manifest_says_so(tiny_dataset):
    import h5py

    data = ShardedDataset(tiny_dataset)
    assert data.manifest["chunk_checksums"] == "fletcher32" and data.checksum_note is None
    for shard in sorted(tiny_dataset.glob("shard-*.h5")):
        with h5py.File(shard, "r") as h5:
            assert all(h5[case][name].fletcher32 for case in h5 for name in ("image", "label", "foreground"))


def test_a_corrupt_chunk_is_an_error_naming_shard_and_case_and_the_other_chunks_still_read(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    shard = copy / "shard-00000.h5"
    assert flip_byte_in_chunk(shard, "a", "image", 0) == (0, 0, 0)
    data, intact = ShardedDataset(copy), ShardedDataset(tiny_dataset)
    with pytest.raises(DatasetError) as caught:
        data.image("a")
    assert str(caught.value).startswith(f"cannot read the image of case 'a' from shard {shard}: a chunk is corrupt")
    assert str(caught.value).endswith(
        f"run python -m unet3d_dist.prepare --verify {copy} and prepare the dataset again"
    )
    beyond_chunk = np.s_[16:, 16:, 16:]
    np.testing.assert_array_equal(data.image("a", beyond_chunk), intact.image("a", beyond_chunk))
    np.testing.assert_array_equal(data.label("a"), intact.label("a"))
    np.testing.assert_array_equal(data.image("b"), intact.image("b"))
    assert verify_dataset(copy) == [f"{shard}: sha256 differs from the manifest"]


def test_a_worker_s_error_reaches_the_main_process_as_the_worker_s_sentence(tiny_dataset, tmp_path):
    import shutil

    from torch.utils.data import DataLoader

    from unet3d_dist.data.crops import CropDataset

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    flip_byte_in_chunk(copy / "shard-00000.h5", "c", "image", 0)  # every crop of case c reads its first chunk
    data = ShardedDataset(copy)
    with pytest.raises(DatasetError) as direct:
        data.image("c")
    loader = DataLoader(
        CropDataset(data, ["c"], (16, 16, 8), 2, seed=0), sampler=[(0, 0), (0, 1)], batch_size=2, num_workers=1
    )
    with pytest.raises(DatasetError) as relayed:
        next(iter(loader))
    assert relayed.value.args[0].startswith("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback")
    assert str(relayed.value) == str(direct.value)


def test_a_dataset_prepared_before_checksums_reads_and_says_so_in_one_line(unchecksummed_dataset, tiny_dataset):
    import h5py

    with h5py.File(unchecksummed_dataset / "shard-00000.h5", "r") as h5:
        assert not any(h5["a"][name].fletcher32 for name in ("image", "label", "foreground"))
    data, checked = ShardedDataset(unchecksummed_dataset), ShardedDataset(tiny_dataset)
    assert "chunk_checksums" not in data.manifest
    note = data.checksum_note
    assert note == (
        f"dataset {unchecksummed_dataset} was prepared without chunk checksums, so a corrupt chunk would go unnoticed; "
        f"python -m unet3d_dist.prepare --verify {unchecksummed_dataset} checks whole files, and preparing it "
        "again adds checksums"
    )
    for case_id in data.case_ids():
        np.testing.assert_array_equal(data.image(case_id), checked.image(case_id))
        np.testing.assert_array_equal(data.foreground(case_id), checked.foreground(case_id))


def test_missing_manifest_and_bad_version(tmp_path):
    with pytest.raises(DatasetError, match="no manifest.json"):
        ShardedDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "unet3d-dist-shards", "version": 99}))
    with pytest.raises(DatasetError, match="version 99"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    "image, label, message",
    [
        (np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 3), np.uint8), "same spatial shape"),
        (np.full((4, 4, 4), np.nan, np.float32), np.zeros((4, 4, 4), np.uint8), "NaN"),
        (np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.int64), "uint8"),
        (np.zeros((4, 4, 4), np.float32), np.full((4, 4, 4), 3, np.uint8), "outside the 2 classes"),
    ],
)
def test_bad_cases_are_refused_and_nothing_is_written(tmp_path, image, label, message):
    from unet3d_dist.data.shards import Case

    with pytest.raises(DatasetError, match=message):
        write_dataset(tmp_path, [Case("bad", image, label)], ["bg", "fg"], name="t", modality="CT", preprocessing={})
    assert list(tmp_path.iterdir()) == []


def edited_copy(dataset, tmp_path, edit) -> tuple:
    """A copy of ``dataset`` whose manifest ``edit(manifest)`` changed in place, and its manifest path."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return copy, copy / "manifest.json"


def test_a_manifest_edited_to_say_what_its_shards_do_not_is_refused_naming_the_key_and_both_values(
    tiny_dataset, tmp_path
):
    copy, manifest = edited_copy(tiny_dataset, tmp_path, lambda m: m["classes"].append("tumour"))
    with pytest.raises(DatasetError) as caught:
        ShardedDataset(copy)
    assert str(caught.value) == (
        f"{manifest} gives classes as ['background', 'box', 'tumour'] but shard {copy / 'shard-00000.h5'} records "
        "['background', 'box']: the manifest was edited or belongs to other shards; undo the edit or prepare the "
        "dataset again"
    )
    assert verify_dataset(copy) == [str(caught.value)]

    def reshape(m):
        m["cases"][1]["shape"] = [45, 40, 24]

    copy, manifest = edited_copy(tiny_dataset, tmp_path / "shape", reshape)
    with pytest.raises(
        DatasetError, match=r"gives case 'b' shape as \[45, 40, 24\] but shard .*records \[44, 40, 24\]"
    ):
        ShardedDataset(copy)


def test_a_reformatted_manifest_with_edited_splits_opens_and_older_shards_are_checked_as_far_as_they_can_be(
    tiny_dataset, tmp_path
):
    import h5py

    def resplit(m):
        m["cases"][0]["split"] = "test"

    copy, manifest = edited_copy(tiny_dataset, tmp_path, resplit)
    manifest.write_text(json.dumps(json.loads(manifest.read_text()), sort_keys=True))  # one line, keys reordered
    data = ShardedDataset(copy)
    assert data.case_ids("test") == ["a", "f"] and data.unchecked_note is None and verify_dataset(copy) == []

    for shard in copy.glob("shard-*.h5"):  # as written before shards stored their class and channel names
        with h5py.File(shard, "r+") as h5:
            del h5.attrs["classes"], h5.attrs["channels"]
    data = json.loads(manifest.read_text())
    data["classes"].append("tumour")
    manifest.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"gives classes as \['background', 'box', 'tumour'\] but .* records '2 "):
        ShardedDataset(copy)
    for shard in copy.glob("shard-*.h5"):  # and before they stored their records
        with h5py.File(shard, "r+") as h5:
            del h5.attrs["manifest_records"]
    assert ShardedDataset(copy).unchecked_note == (
        f"dataset {copy} was prepared before shards carried their own records (shard-00000.h5, shard-00001.h5), so "
        "its manifest cannot be checked against them; preparing it again adds them"
    )
