"""Typed run configuration.

Precedence is fixed: dataclass defaults < YAML file < dotted command-line overrides
(``optim.lr=0.02 train.epochs=3``). Every field carries a one-line doc and its valid range, so a bad
key or value is refused with one sentence that names the key and what is allowed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .exit_codes import BadInput
from .files import atomic_write_text, why_missing


class ConfigError(BadInput, ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


def setting(
    default: Any, doc: str, *, min: float | None = None, max: float | None = None, length: int | None = None
) -> Any:
    """A config field with its documentation, inclusive numeric bounds (of each item, for a list) and, for a list, how
    many items it holds."""
    metadata = {"doc": doc, "min": min, "max": max, "length": length}
    if isinstance(default, (list, dict)):  # mutable: every instance gets its own copy
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """Which dataset is read and how training crops are drawn from it."""

    dataset: str = setting("synthetic", "'synthetic' for the built-in CT phantom, or the folder of a prepared dataset")
    synthetic_dir: str = setting("~/.cache/unet3d_dist/synthetic", "where the synthetic phantom is generated once")
    synthetic_cases: int = setting(24, "number of phantom volumes (2/3 train, 1/6 val, 1/6 test)", min=3)
    synthetic_channels: int = setting(
        2,
        "phantom channels: 2 (portal-venous and arterial CT of the same anatomy), or 1 (portal-venous only, where a "
        "spleen as bright as the liver can pass for it)",
        min=1,
        max=2,
    )
    crop: tuple[int, int, int] = setting(
        (64, 64, 48), "training crop (x, y, z) in voxels; configs/default.yaml has the full-size 112x112x80"
    )
    foreground_fraction: float = setting(1 / 3, "share of crops centred on a foreground voxel", min=0.0, max=1.0)
    flip_axes: str = setting(
        "yz",
        "axes that random flips mirror: letters of x, y, z, or 'none'; x is left-right in prepared (LPS) data, which "
        "the default leaves alone so that organs keep their side",
    )
    rotate_deg: float = setting(
        0.0,
        "largest random rotation about each axis, in degrees (voxel space: for isotropic data); 0 disables",
        min=0.0,
        max=180.0,
    )
    scale: float = setting(0.0, "largest random zoom, e.g. 0.15 for [0.85, 1.15]; 0 disables", min=0.0, max=0.5)
    spatial_prob: float = setting(
        0.3, "share of crops rotated/scaled when rotate_deg or scale is set", min=0.0, max=1.0
    )
    intensity_aug: bool = setting(False, "nnU-Net-style brightness, contrast, gamma and noise changes")
    augment_device: Literal["auto", "cpu", "device"] = setting(
        "auto",
        "where rotated/scaled crops are resampled and intensity changes applied: cpu in the loader workers, device "
        "batched on the training device from what the workers read and draw; auto is device on GPUs",
    )
    resident: Literal["auto", "on", "off"] = setting(
        "auto",
        "keep the train cases on the training device and cut, resample and augment crops there, with no loader "
        "workers; auto is on for a CUDA device when they take at most 25 % of its free memory (and augment_device "
        "is not cpu)",
    )
    samples_per_epoch: int = setting(100, "crops per epoch, summed over all ranks", min=1)
    num_workers: int = setting(
        -1, "DataLoader workers per rank; -1: one per core of the rank's share of the job's CPUs, less one", min=-1
    )
    train_split: str = setting("train", "manifest split used for training")
    val_split: str = setting("val", "manifest split used for validation (ignored when data.folds > 0)")
    folds: int = setting(
        0, "cross-validation: deal the train_split cases into this many folds; 0 uses the manifest splits", min=0
    )
    fold: int = setting(0, "the fold held out for validation when data.folds > 0", min=0)

    @property
    def flip_axis_indices(self) -> tuple[int, ...]:
        return () if self.flip_axes == "none" else tuple("xyz".index(axis) for axis in self.flip_axes)


MIN_LEVELS, MAX_LEVELS = 3, 6  # deep supervision has heads on the first 3 levels; 6 halve a side 5 times, as nnU-Net


def side_divisor(levels: int) -> int:
    """What every input side of a ``levels``-level UNet must be a multiple of: it halves each side levels - 1 times."""
    return 2 ** (levels - 1)


@dataclass
class ModelConfig:
    """Shape of the residual 3D UNet."""

    widths: tuple[int, ...] = setting(
        (16, 32, 64, 128),
        f"channels at each resolution level, full resolution first: {MIN_LEVELS} to {MAX_LEVELS} levels, each "
        "halving the crop's sides",
    )
    norm: Literal["instance", "group", "batch"] = setting(
        "group", "normalisation layer (batch becomes SyncBatchNorm under DDP)"
    )
    deep_supervision: bool = setting(False, "add auxiliary heads at 1/2 and 1/4 resolution to the loss")


@dataclass
class LossConfig:
    """Weights and conventions of the Dice + cross-entropy loss."""

    dice_weight: float = setting(0.5, "weight of the soft Dice term", min=0.0)
    ce_weight: float = setting(0.5, "weight of the cross-entropy term", min=0.0)
    include_background: bool = setting(False, "count the background class in the Dice mean")
    batch_dice: bool = setting(True, "pool Dice over the whole batch instead of averaging per sample")
    smooth: float = setting(1e-5, "added to Dice numerator and denominator for numerical safety", min=0.0)


@dataclass
class OptimConfig:
    """SGD with momentum and its learning-rate decay."""

    lr: float = setting(0.01, "initial learning rate (never rescaled with the world size)", min=0.0)
    momentum: float = setting(0.99, "SGD momentum", min=0.0, max=1.0)
    nesterov: bool = setting(True, "use Nesterov momentum")
    weight_decay: float = setting(3e-5, "L2 weight decay", min=0.0)
    schedule: Literal["poly", "step", "constant"] = setting("poly", "LR decay over the run")
    poly_power: float = setting(0.9, "exponent of the poly decay", min=0.0)
    step_every: int = setting(2500, "iterations between step decays (schedule=step)", min=1)
    step_gamma: float = setting(0.1, "factor applied at every step decay (schedule=step)", min=0.0, max=1.0)
    grad_clip: float = setting(12.0, "clip the global gradient norm to this value; 0 disables", min=0.0)


@dataclass
class TrainConfig:
    """Length, precision and placement of the run."""

    epochs: int = setting(6, "number of epochs", min=1)
    batch_size: int = setting(
        2, "crops per micro-batch on each rank, the group whose Dice pools its crops (loss.batch_dice)", min=1
    )
    global_batch: int = setting(
        0,
        "crops per optimizer step over all ranks; 0: batch_size x the world size at the start. Fixed for the run "
        "(kept in its checkpoints), so it continues on any world size that divides it, accumulating micro-batches",
        min=0,
    )
    seed: int = setting(0, "seed for weights and crops; crops depend on (seed, epoch, sample index) only")
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto", "where to train; auto takes the GPU of the local rank if present"
    )
    amp: Literal["auto", "bf16", "fp16", "off"] = setting(
        "auto",
        "mixed precision; auto is bf16 on capable GPUs, fp16 on others, bf16 on CPUs with AVX512-BF16 or AMX, else off",
    )
    channels_last: Literal["auto", "on", "off"] = setting(
        "auto",
        "channels_last_3d memory format; auto is on for CPUs and, on GPUs, the faster format in a short probe on the "
        "first rank; the resolved value is stored with the run and kept on resume",
    )
    compile: Literal["auto", "on", "off"] = setting("auto", "wrap the model in torch.compile; auto compiles on GPUs")
    compile_backend: str = setting(
        "inductor", "torch.compile's backend (inductor generates kernels; aot_eager or eager only trace, to debug)"
    )
    resume: str = setting(
        "auto", "'auto' continues from the run's latest checkpoint, 'never' starts fresh, or a checkpoint path"
    )
    val_every: int = setting(3, "validate every N epochs (and after the last); 0 disables", min=0)
    val_distances: bool = setting(
        False, "also score ASD, ASSD, HD95 and HD at validation (slower; Dice is always scored)"
    )
    max_nonfinite: int = setting(10, "stop after this many skipped non-finite steps in a row", min=1)
    init_timeout_s: int = setting(600, "timeout of the process-group rendezvous and collectives", min=1)


@dataclass
class InferenceConfig:
    """Whole-volume prediction for validation, evaluate and predict (which read it from the checkpoint)."""

    batch_size: int = setting(4, "windows per forward pass (more keep a GPU busier; evaluate --batch-size wins)", min=1)
    overlap: float = setting(
        0.5, "overlap of neighbouring sliding windows, as a fraction of the patch", min=0.0, max=0.9
    )
    tta_flips: bool = setting(
        False, "average the logits over every flip along data.flip_axes (8 passes for xyz, 4 for the default yz)"
    )
    largest_component: Literal["auto", True, False] = setting(
        "auto",
        "keep only the largest connected component of each class; auto: what the dataset's manifest advises (true "
        "when every class is one piece in its labels), resolved when training starts and kept in the checkpoint",
    )


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = setting(0, "also checkpoint every N optimizer steps; 0 means at epoch ends only", min=0)
    keep_last: int = setting(2, "number of recent checkpoints kept besides best.pt", min=1)


@dataclass
class LogConfig:
    """Run directory, console and wandb."""

    run_name: str = setting("synthetic", "name of the run; its files go to <runs_dir>/<run_name>")
    runs_dir: str = setting("runs", "parent folder of run directories")
    every_steps: int = setting(10, "console/wandb logging interval in optimizer steps", min=1)
    wandb: Literal["offline", "online", "disabled"] = setting("offline", "wandb mode (env WANDB_MODE wins)")
    wandb_project: str = setting("unet3d-dist", "wandb project name")
    crop_keys: bool = setting(
        False, "record the (epoch, index) keys of every step's crops in <run>/crop_keys/, to check the data order"
    )


@dataclass
class Config:
    """The whole run configuration; one section per component."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def inference_tta_axes(self) -> tuple[int, ...]:
        """Flip test-time augmentation mirrors what training mirrored, and only when inference.tta_flips says so."""
        return self.data.flip_axis_indices if self.inference.tta_flips else ()

    @property
    def run_dir(self) -> Path:
        return Path(self.log.runs_dir) / self.log.run_name

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in _sections()}

    def dump(self, path: Path) -> None:
        """Write the resolved configuration as YAML (atomically, since resumes read it back)."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def read_yaml(path: str | Path, what: str) -> Any:
    """The contents of a YAML (or JSON) file; a missing or unparsable file is one ConfigError naming ``what`` and the
    path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} {why_missing(path)}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated Config from defaults, an optional YAML file, then ``section.key=value`` overrides."""
    cfg = Config()
    if path is not None:
        fill(cfg, read_yaml(path, "config file") or {}, "config")
    for item in overrides or []:
        dotted, sep, text = item.partition("=")
        if not sep or "." not in dotted:
            raise ConfigError(f"override '{item}' must look like section.key=value, for example optim.lr=0.02")
        section, _, key = dotted.strip().partition(".")
        fill(cfg, {section: {key: yaml.safe_load(text) if text.strip() else ""}}, "config")
    _check_consistency(cfg)
    return cfg


def config_from_dict(values: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (as stored in checkpoints), validating every value."""
    cfg = Config()
    fill(cfg, values, "config")
    _check_consistency(cfg)
    return cfg


def fill(section: Any, values: Any, what: str, where: str = "") -> None:
    """Set a dataclass's fields from a YAML mapping, recursing into nested sections: the one place where the config
    and the prepare recipe (``what`` in messages) refuse an unknown key, with a did-you-mean, or a value of the wrong
    type or range. ``where`` is the section's dotted name."""
    if not isinstance(values, dict):
        named = f"{what} section '{where}'" if where else f"the {what}"
        raise ConfigError(f"{named} must be a mapping of keys to values, not {values!r}")
    fields = {f.name: f for f in dataclasses.fields(section)}
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            listed = f"keys in '{where}'" if where else f"the {what}'s keys"
            raise ConfigError(
                f"unknown {what} key '{dotted}'{_suggest(str(key), fields)}; {listed} are: {', '.join(fields)}"
            )
        if dataclasses.is_dataclass(hints[key]):
            fill(getattr(section, key), value, what, dotted)
        else:
            setattr(section, key, _coerce(dotted, value, hints[key], fields[key].metadata))


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# A scalar type -> how messages name one value of it, and several, and whether a YAML value is one.
_SCALARS: dict[Any, tuple[str, str, Callable[[Any], bool]]] = {
    bool: ("true or false", "booleans", lambda v: isinstance(v, bool)),
    int: ("an integer", "integers", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", "numbers", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a non-empty string", "non-empty strings", lambda v: isinstance(v, str) and bool(v)),
    Any: ("anything", "values", lambda v: True),
}


def _coerce(key: str, value: Any, hint: Any, meta: Any) -> Any:
    """``value`` as a field of type ``hint`` holds it, or a ConfigError naming ``key`` and what the type allows."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return _choice(key, value, typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return _either(key, value, hint, meta)
    if origin in (list, tuple):
        return _sequence(key, value, hint, meta)
    if origin is dict:
        return _mapping(key, value, hint, meta)
    if hint is float:
        value = _number_from_text(value, float)
    if not _SCALARS[hint][2](value):
        raise ConfigError(f"{key} must be {_phrase(hint, meta)}, not {value!r}")
    return _bounded(key, float(value), meta) if hint is float else _bounded(key, value, meta)


def _choice(key: str, value: Any, choices: tuple[Any, ...]) -> Any:
    if isinstance(value, bool) and ("off" if not value else "on") in choices:
        value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean: train.amp=off
    if not any(value == choice and type(value) is type(choice) for choice in choices):  # 1 is not true
        raise ConfigError(f"{key} must be one of {choice_names(choices)}, not {value!r}")
    return value


def _either(key: str, value: Any, hint: Any, meta: Any) -> Any:
    """The first type of a union that takes ``value``; None where the union allows it."""
    options = [option for option in typing.get_args(hint) if option is not types.NoneType]
    if value is None and types.NoneType in typing.get_args(hint):
        return None
    if len(options) == 1:  # X | None: X's own message, bounds included
        return _coerce(key, value, options[0], meta)
    for option in options:
        with contextlib.suppress(ConfigError):
            return _coerce(key, value, option, meta)
    raise ConfigError(f"{key} must be {_phrase(hint, meta)}, not {value!r}")


def _sequence(key: str, value: Any, hint: Any, meta: Any) -> Any:
    """A list (a tuple for tuple fields) of the length the type or ``setting(length=)`` fixes, coerced item by item."""
    origin, item_types = typing.get_origin(hint), typing.get_args(hint)
    fixed = origin is tuple and item_types[-1] is not Ellipsis
    length = len(item_types) if fixed else meta.get("length")
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        raise ConfigError(f"{key} must be {_phrase(hint, meta)}, not {value!r}")
    item_types = item_types if fixed else item_types[:1] * len(value)
    return origin(_coerce(key, v, t, meta) for v, t in zip(value, item_types))


def _mapping(key: str, value: Any, hint: Any, meta: Any) -> dict[str, Any]:
    """A mapping from names to values of one type, each coerced as ``key.name``."""
    if not isinstance(value, dict) or not all(isinstance(name, str) and name for name in value):
        raise ConfigError(f"{key} must be {_phrase(hint, meta)}, not {value!r}")
    item_type = typing.get_args(hint)[1]
    return {name: _coerce(f"{key}.{name}", v, item_type, meta) for name, v in value.items()}


def _phrase(hint: Any, meta: Any, plural: bool = False) -> str:
    """What ``hint`` allows, as messages say it: 'a number', 'a list of 3 integers', 'one of lzf, gzip, none'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return f"one of {choice_names(args)}"
    if origin in (typing.Union, types.UnionType):
        named = [_phrase(a, meta) for a in args if a is not types.NoneType] + ["null"] * (types.NoneType in args)
        return ", ".join(named[:-1]) + " or " + named[-1]
    if origin in (list, tuple):
        length = len(args) if origin is tuple and args[-1] is not Ellipsis else meta.get("length")
        return f"{'lists' if plural else 'a list'} of {f'{length} ' if length else ''}{_phrase(args[0], meta, True)}"
    if origin is dict:
        return f"{'mappings' if plural else 'a mapping'} of names to {_phrase(args[1], meta, True)}"
    return _SCALARS[hint][plural]


def choice_names(choices: tuple[Any, ...]) -> str:
    """``auto, true, false``: the choices as YAML spells them."""
    return ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)


def _number_from_text(value: Any, kind: type) -> Any:
    """YAML 1.1 reads '1e-3' (no dot) as text; accept it as the number every user means."""
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            return value
    return value


def _bounded(key: str, value: float, meta: Any) -> Any:
    low, high = meta.get("min"), meta.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        span = (
            f"between {low} and {high}"
            if low is not None and high is not None
            else (f">= {low}" if low is not None else f"<= {high}")
        )
        raise ConfigError(f"{key} must be {span}, not {value}")
    return value


def _check_consistency(cfg: Config) -> None:
    """Rules that involve more than one field."""
    levels = len(cfg.model.widths)
    if not MIN_LEVELS <= levels <= MAX_LEVELS:
        raise ConfigError(
            f"model.widths needs {MIN_LEVELS} to {MAX_LEVELS} entries (one per level), not {list(cfg.model.widths)}"
        )
    step = side_divisor(levels)
    for axis, size in zip("xyz", cfg.data.crop):
        if size < step or size % step:
            raise ConfigError(
                f"data.crop must be multiples of {step} (the {levels}-level UNet halves each side {levels - 1} "
                f"times), but its {axis} side is {size}"
            )
    axes = cfg.data.flip_axes
    if axes != "none" and (not set(axes) <= set("xyz") or len(set(axes)) != len(axes)):
        raise ConfigError(f"data.flip_axes must be letters of x, y, z (each once) or 'none', not {axes!r}")
    if cfg.data.folds and cfg.data.fold >= cfg.data.folds:
        raise ConfigError(f"data.fold must be below data.folds={cfg.data.folds}, not {cfg.data.fold}")
    if cfg.data.folds == 1:
        raise ConfigError("data.folds must be 0 (manifest splits) or at least 2")
    if any(w < 1 for w in cfg.model.widths):
        raise ConfigError(f"model.widths must be positive, not {list(cfg.model.widths)}")
    if cfg.loss.dice_weight == 0 and cfg.loss.ce_weight == 0:
        raise ConfigError("loss.dice_weight and loss.ce_weight cannot both be 0")


def describe(section_type: type = Config, indent: str = "") -> str:
    """Every key with its default, its doc and, for choice fields, the allowed values, for ``--help-config``; a nested
    section is its docstring, then its keys indented."""
    lines = []
    hints = typing.get_type_hints(section_type)
    for f in dataclasses.fields(section_type):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            lines += [f"{indent}{f.name}:  # {hint.__doc__}", describe(hint, indent + "  ")]
            continue
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        allowed = f" (one of: {choice_names(choices)})" if choices else ""
        lines.append(f"{indent}{f.name}: {_shown(f)}  # {f.metadata['doc']}{allowed}")
    return "\n".join(lines)


def _shown(f: dataclasses.Field) -> str:
    """A field's default as YAML users write it (a list for a tuple, null for None)."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return "null" if default is None else repr(list(default) if isinstance(default, tuple) else default)
