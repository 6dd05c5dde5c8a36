import numpy as np
import pytest
import torch
from conftest import tiny_cases
from torch.utils.data import DataLoader

from unet3d_dist.config import ConfigError, load_config
from unet3d_dist.data.augment import Augmentation, rotation, transformed_crop
from unet3d_dist.data.crops import CropDataset, EpochSampler
from unet3d_dist.data.shards import Case, ShardedDataset, write_dataset


@pytest.fixture(scope="module")
def data(tiny_dataset):
    return ShardedDataset(tiny_dataset)


def make(data, crop=(16, 16, 8), fg=1 / 3, flip=(0, 1, 2), ids=("a", "b", "c", "d"), n=32, seed=7):
    return CropDataset(data, list(ids), crop, n, seed, fg, flip)


def test_crops_lie_inside_the_volume_and_match_it(data):
    crops = make(data, crop=(16, 16, 8), flip=(), ids=("a", "b"))
    for index in range(40):
        image, label = crops[(3, index)]
        case = crops.case_ids[index % 2]
        shape = data.records[case]["shape"]
        start = crops.crop_start(np.random.default_rng([7, 3, index]), case, shape)
        assert all(0 <= s and s + c <= n for s, c, n in zip(start, crops.crop, shape))
        window = tuple(slice(s, s + c) for s, c in zip(start, crops.crop))
        assert image.shape == (1, 16, 16, 8) and label.shape == (16, 16, 8)
        np.testing.assert_array_equal(image[0].numpy(), data.image(case)[0][window])
        np.testing.assert_array_equal(label.numpy(), data.label(case)[window])


def test_small_volumes_are_padded_with_their_minimum_and_background(data):
    crops = make(data, crop=(24, 24, 16), flip=(), ids=("c",))
    full_image, full_label = data.image("c")[0], data.label("c")
    for index in range(10):
        image, label = crops[(0, index)]
        start = crops.crop_start(np.random.default_rng([7, 0, index]), "c", [20, 18, 12])
        inside = tuple(slice(-s, -s + n) for s, n in zip(start, (20, 18, 12)))
        np.testing.assert_array_equal(image[0].numpy()[inside], full_image)
        np.testing.assert_array_equal(label.numpy()[inside], full_label)
        outside = np.ones((24, 24, 16), bool)
        outside[inside] = False
        assert (image[0].numpy()[outside] == full_image.min()).all()
        assert (label.numpy()[outside] == 0).all()


def test_flips_are_whole_axis_flips_of_the_same_crop_and_each_axis_is_used(data):
    plain, flipped = make(data, flip=()), make(data, flip=(0, 1, 2))
    counts = np.zeros(3)
    for index in range(60):
        base, _ = plain[(1, index)]
        got, _ = flipped[(1, index)]
        matches = [
            axes
            for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
            if torch.equal(got[0], base[0].flip(axes) if axes else base[0])
        ]
        assert matches, "a flipped crop must be the plain crop flipped along whole axes"
        for axis in matches[0]:
            counts[axis] += 1
    assert ((counts > 15) & (counts < 45)).all(), counts


def test_flips_limited_to_some_axes_keep_the_others_and_each_axis_its_draw(data):
    everything, no_left_right = make(data, flip=(0, 1, 2)), make(data, flip=(1, 2))
    for index in range(40):
        got, _ = no_left_right[(1, index)]
        all_axes, _ = everything[(1, index)]
        # The same draws: undoing a possible x flip of the all-axes crop gives the crop without x flips.
        assert torch.equal(got[0], all_axes[0]) or torch.equal(got[0], all_axes[0].flip(0))
    assert load_config(None, ["data.flip_axes=yz"]).data.flip_axis_indices == (1, 2)
    assert load_config(None, ["data.flip_axes=none"]).data.flip_axis_indices == ()
    with pytest.raises(ConfigError, match="data.flip_axes must be letters of x, y, z"):
        load_config(None, ["data.flip_axes=xw"])


def test_foreground_oversampling_share(tmp_path):
    label = np.zeros((64, 64, 64), np.uint8)
    label[31:33, 31:33, 31:33] = 1
    write_dataset(
        tmp_path,
        [Case("big", np.zeros(label.shape, np.float32), label)],
        ["bg", "fg"],
        name="t",
        modality="CT",
        preprocessing={},
    )
    data = ShardedDataset(tmp_path)

    def share(fraction: float, draws: int = 900) -> float:
        crops = CropDataset(data, ["big"], (16, 16, 16), draws, 0, fraction, flip_axes=())
        return np.mean([crops[(0, i)][1].any().item() for i in range(draws)])

    baseline = share(0.0)  # random crops hit the small object by chance this often
    assert baseline < 0.1
    assert share(1 / 3) == pytest.approx(1 / 3 + 2 / 3 * baseline, abs=0.05)
    assert share(1.0) == 1.0


def batches(dataset, world_size, rank, workers, epoch=2, skip=0):
    sampler = EpochSampler(len(dataset), world_size, rank, seed=5)
    sampler.set_epoch(epoch, skip)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers)
    keys = [key for key in sampler]
    return keys, [batch for batch in loader]


def test_same_crops_across_reruns_worker_counts_ranks_and_resumes(data):
    dataset = make(data, n=16)
    keys, reference = batches(dataset, 1, 0, workers=0)
    _, rerun = batches(dataset, 1, 0, workers=0)
    _, with_workers = batches(dataset, 1, 0, workers=2)
    for a, b, c in zip(reference, rerun, with_workers):
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    by_key = {key: dataset[key][0] for key in keys}
    for rank in range(2):
        rank_keys, rank_batches = batches(dataset, 2, rank, workers=1)
        flat = [img for batch in rank_batches for img in batch[0]]
        assert all(torch.equal(img, by_key[key]) for key, img in zip(rank_keys, flat))
    # A resume after 3 batches sees exactly the remaining batches.
    _, resumed = batches(dataset, 1, 0, workers=2, skip=6)
    assert len(resumed) == len(reference) - 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(reference[3:], resumed))


def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    seen = []
    for rank in range(3):
        sampler = EpochSampler(30, 3, rank, seed=1)
        sampler.set_epoch(4)
        seen += [index for _, index in sampler]
    assert sorted(seen) == list(range(30))
    first, second = EpochSampler(30, 1, 0, 1), EpochSampler(30, 1, 0, 1)
    second.set_epoch(1)
    assert [i for _, i in first] != [i for _, i in second]  # reshuffled every epoch


def test_cross_validation_folds_partition_the_training_cases(tiny_dataset):
    from unet3d_dist.config import load_config
    from unet3d_dist.data.splits import run_cases

    data = ShardedDataset(tiny_dataset)
    held_out = []
    for fold in range(3):
        cfg = load_config(None, ["data.folds=3", f"data.fold={fold}"]).data
        train, val = run_cases(data, cfg, "train"), run_cases(data, cfg, "val")
        assert set(train) | set(val) == {"a", "b", "c", "d"} and not set(train) & set(val)
        held_out += val
    assert sorted(held_out) == ["a", "b", "c", "d"]  # every training case is held out exactly once
    assert run_cases(data, load_config().data, "val") == ["e"]  # without folds: the manifest's split


def test_spatial_transform_is_exact_for_identity_and_quarter_turns(data):
    shape = data.records["a"]["shape"]
    read = lambda region: (data.image("a", region), data.label("a", region))  # noqa: E731
    start = np.array([10, 8, 6])
    crop = (16, 16, 8)
    centre = start + (np.array(crop) - 1) / 2
    plain = tuple(slice(s, s + c) for s, c in zip(start, crop))
    image, label = transformed_crop(read, shape, centre, crop, np.eye(3), pad=[-5.0])
    np.testing.assert_allclose(image[0], data.image("a")[0][plain], atol=1e-5)
    np.testing.assert_array_equal(label, data.label("a")[plain])
    quarter = rotation(np.deg2rad([0.0, 0.0, 90.0]))  # about z; the crop is square in x-y
    image, label = transformed_crop(read, shape, centre, crop, quarter, pad=[-5.0])
    np.testing.assert_allclose(image[0], np.rot90(data.image("a")[0][plain], k=-1, axes=(0, 1)), atol=1e-5)
    np.testing.assert_array_equal(label, np.rot90(data.label("a")[plain], k=-1, axes=(0, 1)))


def test_augmented_crops_stay_deterministic_and_valid(data):
    aug = Augmentation(rotate_deg=20, scale=0.2, spatial_prob=1.0, intensity=True)
    crops = CropDataset(data, ["a", "b", "c"], (16, 16, 8), 30, 3, 0.5, (0, 1, 2), aug)
    plain = CropDataset(data, ["a", "b", "c"], (16, 16, 8), 30, 3, 0.5, (0, 1, 2))
    changed = 0
    for index in range(30):
        image, label = crops[(1, index)]
        again, _ = crops[(1, index)]
        assert torch.equal(image, again) and torch.isfinite(image).all()
        assert set(label.unique().tolist()) <= {0, 1}
        changed += not torch.equal(image, plain[(1, index)][0])
    assert changed == 30


def device_crop(data, case_id, centre, crop, matrix, flips=()):
    """A crop the device path's way: the region and affine map a worker makes, resampled by grid_sample."""
    from unet3d_dist.data.augment import crop_region, flipped_affine
    from unet3d_dist.data.device_augment import resample

    region, offset = crop_region(data.records[case_id]["shape"], centre, crop, matrix)
    matrix, offset = flipped_affine(matrix, offset, flips, crop)
    affine = torch.from_numpy(np.concatenate([matrix, offset[:, None]], 1))
    image, label = torch.from_numpy(data.image(case_id, region)), torch.from_numpy(data.label(case_id, region))
    return [t.numpy() for t in resample(image, label, affine, crop, pad=[-5.0])]


@pytest.mark.parametrize(
    ("angles", "zoom", "exact"), [((0, 0, 0), 1.0, True), ((0, 0, 90), 1.0, True), ((10, -7, 25), 0.9, False)]
)
def test_device_resampling_gives_the_workers_crop(data, angles, zoom, exact):
    shape, crop = data.records["a"]["shape"], (16, 16, 8)
    centre = np.array([10, 8, 6]) + (np.array(crop) - 1) / 2
    matrix = rotation(np.deg2rad(angles)) / zoom
    read = lambda region: (data.image("a", region), data.label("a", region))  # noqa: E731
    cpu_image, cpu_label = transformed_crop(read, shape, centre, crop, matrix, pad=[-5.0])
    image, label = device_crop(data, "a", centre, crop, matrix)
    if exact:  # identity and quarter turns: whole voxels, as the workers' resampling gives them
        np.testing.assert_allclose(image, cpu_image, atol=1e-5)
        np.testing.assert_array_equal(label, cpu_label)
    else:  # other angles: the same within interpolation rounding
        assert np.abs(image - cpu_image).mean() < 1e-3 and (label == cpu_label).mean() > 0.99
    flipped_image, flipped_label = device_crop(data, "a", centre, crop, matrix, flips=(0, 2))
    np.testing.assert_allclose(flipped_image, np.flip(image, (1, 3)), atol=1e-5)  # flips folded into the map
    np.testing.assert_array_equal(flipped_label, np.flip(label, (0, 2)))


@pytest.mark.parametrize("dataset", ["data", "two_channel"])
def test_crops_finished_on_the_device_are_the_workers_crops_and_repeat(dataset, request):
    """Both paths draw the same spatial and intensity changes (per channel) and give the same crops; with two
    channels some crop changes one channel's intensity and not the other's."""
    from unet3d_dist.data.device_augment import collate_parts, finish_batch

    data = request.getfixturevalue(dataset)
    channels = len(data.channels)
    aug = Augmentation(rotate_deg=20, scale=0.2, spatial_prob=0.5, intensity=True)
    workers = CropDataset(data, ["a", "b", "c"], (16, 16, 8), 24, 3, 0.5, (1, 2), aug)
    device = CropDataset(data, ["a", "b", "c"], (16, 16, 8), 24, 3, 0.5, (1, 2), aug, finish_on_device=True)
    keys = [(2, i) for i in range(24)]
    images, labels = finish_batch(collate_parts([device[k] for k in keys]), (16, 16, 8), torch.device("cpu"))
    again, _ = finish_batch(collate_parts([device[k] for k in keys]), (16, 16, 8), torch.device("cpu"))
    assert torch.equal(images, again)  # a pure function of (seed, epoch, index) on this path too
    assert images.shape == (24, channels, 16, 16, 8)
    apart = 0
    for i, key in enumerate(keys):
        image, label = workers[key]
        noise = not np.isnan(device[key]["intensity"][:, 3]).all()  # noise values come from torch's generator
        close = torch.allclose(images[i], image, atol=1e-4) if not noise else (images[i] - image).abs().mean() < 0.2
        assert close and (labels[i] == label).float().mean() > 0.99, key
        apart += channels == 2 and not torch.allclose(image[1], 3 * image[0] - 1, atol=1e-3)
    assert apart > 0 or channels == 1


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory):
    """The tiny cases with a second channel that is an affine copy of the first (3 x - 1)."""
    cases = [
        Case(c.id, np.stack([c.image, 3 * c.image - 1]), c.label, c.spacing, c.origin, split=c.split)
        for c in tiny_cases()
    ]
    root = tmp_path_factory.mktemp("two") / "dataset"
    preprocessing = {"normalization": {"kind": "none"}, "channels": ["first", "second"]}
    write_dataset(root, cases, ["background", "box"], name="two", modality="MR", preprocessing=preprocessing)
    return ShardedDataset(root)


def test_channels_share_crop_flips_and_rotation_and_each_pads_with_its_own_minimum(two_channel):
    aug = Augmentation(rotate_deg=20, scale=0.2, spatial_prob=0.5)
    crops = CropDataset(two_channel, ["a", "c"], (24, 24, 16), 12, 3, 0.5, (0, 1, 2), aug)
    for index in range(12):
        image, label = crops[(0, index)]
        assert image.shape == (2, 24, 24, 16) and label.shape == (24, 24, 16)
        torch.testing.assert_close(image[1], 3 * image[0] - 1, atol=1e-4, rtol=0)  # one transform for both
    low = two_channel.pad_values("c")
    assert low[1] == pytest.approx(3 * low[0] - 1, abs=1e-5)
