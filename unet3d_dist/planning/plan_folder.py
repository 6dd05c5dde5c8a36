"""The plan folder (``python -m unet3d_dist.plan --input FOLDER... --out PLAN``), from the scans to the prepared data.

Reads every case of a source data set (any layout ``prepare`` reads), computes its fingerprint, measures what this
machine affords, and writes into PLAN:

- ``prepare.yaml``: the prepare recipe, with its preprocessing planned (spacing, normalisation per channel, crop);
- ``train.yaml``: the training config: crop, batch, foreground share, augmentation, and a schedule in steps; the
  budget ``--minutes`` trains either one model on every case or a 5-fold ensemble (``planning/budget.py``);
- ``plan.md``: the choices with their reasons, and the predicted cluster runs;
- ``data/``: the prepared data set (unless ``--no-prepare``); its manifest holds the fingerprint.

What the scans cannot say (layout, channels, which label value is which class, name, modality) comes from a base
recipe (``--recipe``), or from a Decathlon task's ``dataset.json``. The rules are in ``planning/rules.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from ..config import ConfigError, load_config
from ..preparation.build import prepare
from ..preparation.recipe import recipe_from_dict
from .planner import Plan, make_plan
from .sources import base_recipe, fingerprint_of

CLUSTER_COLUMNS = ["GPUs", "nodes", "batch per GPU", "global batch", "steps", "efficiency", "wall time"]


def write_plan(out: Path, plan: Plan, data: Path) -> None:
    """prepare.yaml, train.yaml and plan.md; the training config reads the data set the plan prepares."""
    train = {
        "data": {"dataset": str(data.resolve()), **plan.train["data"]},
        **{section: values for section, values in plan.train.items() if section != "data"},
        "log": {"run_name": out.name},
    }
    overrides = [
        f"{s}.{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for s in train for k, v in train[s].items()
    ]
    load_config(None, overrides)  # it must load as users will load it
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare.yaml").write_text(yaml.safe_dump(plan.recipe, sort_keys=False))
    (out / "train.yaml").write_text(yaml.safe_dump(train, sort_keys=False))
    lines = ["| setting | value | why |", "|---|---|---|"]
    lines += [f"| {c.setting} | {c.value} | {c.reason} |" for c in plan.choices]
    lines += ["", "| " + " | ".join(CLUSTER_COLUMNS) + " |", "|" + "---:|" * len(CLUSTER_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in plan.cluster]
    lines += ["", f"Next: `{next_command(plan, out)}`"]
    (out / "plan.md").write_text("\n".join(lines) + "\n")


def next_command(plan: Plan, out: Path) -> str:
    """The command that trains the planned model: one run on every case, or crossval's folds."""
    config = out / "train.yaml"
    if plan.runs == 1:
        return f"python -m unet3d_dist.train --config {config}"
    return f"python -m unet3d_dist.crossval --config {config} --folds {plan.runs}"


def show(console: Console, plan: Plan, fingerprint: dict, device: torch.device) -> None:
    """The fingerprint, the plan with its reasons and the planned cluster runs, as tables."""
    spacing, shape = fingerprint["spacing"], fingerprint["shape"]
    console.print(
        f"fingerprint: {fingerprint['cases']} cases; spacing median {spacing['median']} mm "
        f"(range {spacing['min']} to {spacing['max']}); shape median {shape['median']}; stored orientations "
        f"{', '.join(fingerprint['orientations'])}"
    )
    classes = Table(title="classes", title_justify="left")
    for column in ("class", "median volume (mL)", "cases holding it"):
        classes.add_column(column, justify="left" if column == "class" else "right")
    for name, stats in fingerprint["classes"].items():
        classes.add_row(name, f"{stats['median_volume_ml']:.3g}", f"{stats['share_of_cases']:.0%}")
    console.print(classes)
    table = Table(title=f"plan (measured on this {device.type})", title_justify="left")
    for column in ("setting", "value", "why"):
        table.add_column(column)
    for choice in plan.choices:
        table.add_row(choice.setting, str(choice.value), choice.reason)
    console.print(table)
    runs = Table(
        title=f"the planned crops on a cluster ({plan.cluster_step}; scaling model of docs/PERFORMANCE.md)",
        title_justify="left",
    )
    for column in CLUSTER_COLUMNS:
        runs.add_column(column, justify="right")
    for row in plan.cluster:
        runs.add_row(*row)
    console.print(runs)


def plan_and_prepare(args: argparse.Namespace) -> int:
    """Fingerprint the scans, plan, write the recipes and, unless --no-prepare, prepare the data; the exit code."""
    console = Console(soft_wrap=True, width=max(160, Console().width))  # the reasons are sentences: room for them
    data = args.out / "data"
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{args.out} is not empty; choose another --out or pass --overwrite")
    recipe = base_recipe(args.input, args.recipe, args.modality)
    fingerprint = fingerprint_of(args.input, recipe, console)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no GPU is visible: plan on the machine that will train")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    plan = make_plan(
        fingerprint, recipe, device, args.minutes, args.memory_gb, args.spacing, args.step_seconds, args.final
    )
    write_plan(args.out, plan, data)
    show(console, plan, fingerprint, device)
    console.print(
        f"[bold green]wrote[/] {args.out / 'prepare.yaml'}, {args.out / 'train.yaml'} and {args.out / 'plan.md'}"
    )
    code = 0
    if not args.no_prepare:
        code = prepare(
            recipe_from_dict(plan.recipe),
            args.input,
            data,
            jobs=args.jobs,
            overwrite=args.overwrite,
            split_file=None,
            console=console,
            extra={"fingerprint": fingerprint},
        )
    console.print(f"next: {next_command(plan, args.out)}")
    return code
