import pytest
import yaml

from unet3d_dist.config import ConfigError, config_from_dict, describe, load_config


def test_defaults():
    cfg = load_config()
    assert cfg.data.crop == (64, 64, 48)  # CPU-sized default; configs/default.yaml has the full 112x112x80
    assert cfg.model.widths == (16, 32, 64, 128)
    assert cfg.data.foreground_fraction == pytest.approx(1 / 3)


def test_precedence_command_line_over_file_over_defaults(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.05, "momentum": 0.9}, "data": {"crop": [32, 32, 16]}}))
    cfg = load_config(path, ["optim.lr=0.02", "train.epochs=3", "model.widths=[8,16,32,64]"])
    assert cfg.optim.lr == 0.02  # command line wins over the file
    assert cfg.optim.momentum == 0.9  # file wins over the default
    assert cfg.data.crop == (32, 32, 16) and cfg.train.epochs == 3 and cfg.model.widths == (8, 16, 32, 64)
    assert cfg.optim.nesterov is True  # default


def test_exponent_notation_is_a_number_in_files_and_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("optim:\n  weight_decay: 3e-5\n")
    cfg = load_config(path, ["optim.lr=1e-3"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 3e-5


def test_a_bare_off_is_the_choice_off_not_yamls_false(tmp_path):
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  amp: off\n")
    assert load_config(recipe).train.amp == "off"


def test_a_choice_of_auto_true_or_false_takes_booleans_but_not_numbers():
    assert load_config(None, ["inference.largest_component=true"]).inference.largest_component is True
    assert load_config(None, []).inference.largest_component == "auto"
    with pytest.raises(ConfigError, match="inference.largest_component must be one of auto, true, false, not 1"):
        load_config(None, ["inference.largest_component=1"])


def test_round_trip_through_dict_and_dump(tmp_path):
    cfg = load_config(None, ["train.amp=bf16", "log.run_name=x"])
    cfg.dump(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg == config_from_dict(cfg.to_dict())


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", r"unknown config key 'optim.lrr' \(did you mean 'lr'\?\); keys in 'optim' are: lr, momentum"),
        ("optimm.lr=0.1", r"unknown config key 'optimm' \(did you mean 'optim'\?\); the config's keys are: data"),
        ("optim.lr=fast", r"optim.lr must be a number, not 'fast'"),
        ("optim.lr=-1", r"optim.lr must be >= 0.0, not -1"),
        ("optim.momentum=1.5", r"optim.momentum must be between 0.0 and 1.0, not 1.5"),
        ("train.epochs=2.5", r"train.epochs must be an integer, not 2.5"),
        ("train.amp=fp8", r"train.amp must be one of auto, bf16, fp16, off, not 'fp8'"),
        ("model.norm=layer", r"model.norm must be one of instance, group, batch"),
        ("train.compile=yes please", r"train.compile must be one of auto, on, off"),
        ("data.crop=[64,64]", r"data.crop must be a list of 3 integers"),
        ("data.crop=[64,60,32]", r"data.crop must be multiples of 8 .* y side is 60"),
        ("model.widths=[8,16]", r"model.widths needs 3 to 6 entries \(one per level\), not \[8, 16\]"),
        ("model.widths=4", r"model.widths must be a list of integers, not 4"),
        ("lr=0.1", r"override 'lr=0.1' must look like section.key=value"),
    ],
)
def test_each_kind_of_error_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_deeper_network_needs_crops_it_can_halve_once_more():
    load_config(None, ["model.widths=[4,8,8,16,16]", "data.crop=[64,64,48]"])  # multiples of 16
    with pytest.raises(
        ConfigError, match=r"multiples of 16 \(the 5-level UNet halves each side 4 times\).* z side is 40"
    ):
        load_config(None, ["model.widths=[4,8,8,16,16]", "data.crop=[64,64,40]"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"config section 'optim' must be a mapping of keys to values, not \[1, 2\]"):
        load_config(bad)
    bad.write_text("optim:\n  lr: 0.1\n train: {}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_field_is_documented():
    text = describe()
    assert "optim:" in text and "lr: 0.01  # initial learning rate" in text
    assert all("#" in line for line in text.splitlines())
    for allowed in ("instance, group, batch", "poly, step, constant", "auto, cpu, cuda", "auto, bf16, fp16, off"):
        assert f"(one of: {allowed})" in text  # choice fields list their values


def test_help_config_lists_the_training_config_then_the_prepare_recipe(capsys):
    from unet3d_dist.train import main

    main(["--help-config"])
    printed = capsys.readouterr().out
    config, recipe = printed.split("\n\nprepare recipe (configs/prepare_*.yaml):\n")
    assert "lr: 0.01  # initial learning rate" in config and "margin_mm" not in config
    assert "  compression: 'lzf'  # HDF5 compression of the volumes (one of: lzf, gzip, none)" in recipe
    assert "\n  crop:  # What each prepared case is cut down to.\n    to: 'none'  # " in recipe  # nested section


def test_shipped_recipes_load():
    from pathlib import Path

    from unet3d_dist.preparation.build import assign_splits
    from unet3d_dist.preparation.recipe import SplitSpec, load_recipe

    for recipe in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        (load_recipe if recipe.name.startswith("prepare_") else load_config)(
            recipe
        )  # prepare recipes are not train configs
    for split_file in sorted((Path(__file__).parents[1] / "configs" / "splits").glob("*.yaml")):
        listed = yaml.safe_load(split_file.read_text())
        ids = [str(case_id) for members in listed.values() for case_id in members]
        assert set(assign_splits(ids, SplitSpec(), split_file).values()) <= {"train", "val", "test"}


RECIPE = {"name": "liver", "modality": "CT", "labels": {"classes": {"background": [0], "liver": [1]}}}


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("modalty", "CT", r"unknown recipe key 'modalty' \(did you mean 'modality'\?\); the recipe's keys are: name"),
        (
            "preprocessing",
            {"crop": {"margin": 5}},
            r"unknown recipe key 'preprocessing.crop.margin' \(did you mean 'margin_mm'\?\); keys in "
            r"'preprocessing.crop' are: to, margin_mm, threshold",
        ),
        ("shards", {"cases_per_shard": "eight"}, r"shards.cases_per_shard must be an integer, not 'eight'"),
        ("input", {"spacing": [1, 1]}, r"input.spacing must be a list of 3 numbers, not \[1, 1\]"),
        ("labels", {"classes": {"background": [0], "liver": 1}}, r"labels.classes.liver must be a list of integers"),
        ("input", {"layout": "dicom"}, r"input.layout must be one of auto, folders, decathlon, hdf5, not 'dicom'"),
        ("splits", {"train": 1.5, "val": 0.0}, r"splits.train must be between 0.0 and 1.0, not 1.5"),
        ("shards", {"chunks": [16, 16, 0]}, r"shards.chunks must be >= 1, not 0"),
        ("preprocessing", {"crop": 10}, r"recipe section 'preprocessing.crop' must be a mapping of keys to values"),
        ("splits", {"train": 0.5}, r"splits.train, splits.val and splits.test must add up to 1, not \[0.5, 0.2, 0.0\]"),
    ],
)
def test_the_recipe_refuses_a_key_or_value_as_the_config_does(section, values, message):
    from unet3d_dist.preparation.recipe import recipe_from_dict

    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({**RECIPE, section: values})
