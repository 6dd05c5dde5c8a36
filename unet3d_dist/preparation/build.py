"""Building a prepared dataset from scans: the library behind ``python -m unet3d_dist.prepare`` and ``plan``.

Cases are prepared in parallel, one per process. The dataset is built in ``<out>.partial`` beside ``<out>``: each
shard there is written atomically and carries its own manifest records, so running the same command after a crash
skips the finished shards; one job at a time builds there (it holds ``run.lock``, run_lock.py). The manifest is
written last and the folder then moves to ``<out>``; an older dataset there is replaced only with ``--overwrite``,
and only once the new one is complete.

A bad case never stops the run or touches the dataset: it is skipped with one sentence naming the file, listed in the
summary and in the manifest's ``skipped``, and the exit status is 3.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ..config import ConfigError, read_yaml
from ..data.shards import (
    MANIFEST,
    DatasetError,
    new_manifest,
    read_shard_notes,
    shard_entry,
    shard_name,
    verify_dataset,
    write_manifest,
    write_shard,
)
from ..exit_codes import SOME_SKIPPED
from ..files import LINK_LOOP, atomic_write_text, is_link_loop, remove_unfinished
from ..logger import progress_bar
from ..optional import require, sitk
from ..run_lock import LOCK_FILE, hold_out
from .cases import prepare_case
from .layouts import Source, find_cases
from .readers import CaseError
from .recipe import Recipe, SplitSpec

SPLIT_ORDER = ("train", "val", "test")
PLAN = "plan.json"


def assign_splits(ids: list[str], spec: SplitSpec, split_file: Path | None) -> dict[str, str]:
    """Case id -> split, from a split file ({split: [ids]}) or by shuffling with the recipe's seed and fractions."""
    if split_file is None:
        order = [ids[i] for i in np.random.default_rng(spec.seed).permutation(len(ids))]
        n_val, n_test = round(spec.val * len(ids)), round(spec.test * len(ids))
        if spec.train > 0 and n_val + n_test >= len(ids):
            n_val = max(0, len(ids) - 1 - n_test)
        cut = len(ids) - n_val - n_test
        return {c: "train" if i < cut else "val" if i < cut + n_val else "test" for i, c in enumerate(order)}
    listed = read_yaml(split_file, "split file")
    if not isinstance(listed, dict) or not all(isinstance(v, list) for v in listed.values()):
        raise ConfigError(f"split file {split_file} must map split names to lists of case ids")
    splits = {}
    for split, members in listed.items():
        for case_id in map(str, members):
            if case_id in splits:
                raise ConfigError(
                    f"split file {split_file} lists case {case_id!r} in both {splits[case_id]!r} and {split!r}"
                )
            splits[case_id] = split
    unknown, missing = sorted(set(splits) - set(ids)), sorted(set(ids) - set(splits))
    problems = ([f"no such case {', '.join(unknown[:5])}"] if unknown else []) + (
        [f"no split for {', '.join(missing[:5])}"] if missing else []
    )
    if problems:
        raise ConfigError(f"split file {split_file} does not match the input: {'; '.join(problems)}")
    return splits


def plan_shards(sources: list[Source], splits: dict[str, str], per_shard: int) -> list[list[Source]]:
    """Cases grouped by split (train, val, test, others), then id, cut into shards of ``per_shard``."""
    rank = {name: i for i, name in enumerate(SPLIT_ORDER)}
    ordered = sorted(sources, key=lambda s: (rank.get(splits[s.id], len(rank)), splits[s.id], s.id))
    return [ordered[i : i + per_shard] for i in range(0, len(ordered), per_shard)]


def _resolved(path: Path) -> str:
    """The real path, for the plan; a symbolic link loop stays as given, for its case to be refused with the rest."""
    return str(path.absolute() if is_link_loop(path) else path.resolve())


def open_workspace(out: Path, plan: dict[str, Any], overwrite: bool) -> Path:
    """The ``<out>.partial`` folder to build in, held by this process (run_lock): resumed when it holds the same plan,
    else new. Refuses, before any work, to replace anything that is not ours or to replace a dataset without
    ``overwrite``, and a folder another job is preparing or that cannot be written."""
    if is_link_loop(out):
        raise DatasetError(f"--out {out} {LINK_LOOP}; choose another --out (nothing was changed)")
    check_out(out, overwrite)
    partial = out.with_name(out.name + ".partial")
    if partial.is_dir() and not (partial / PLAN).is_file() and any(p.name != LOCK_FILE for p in partial.iterdir()):
        raise DatasetError(f"{partial} exists and was not made by prepare; move it away (nothing was changed)")
    hold_out(out, partial)  # held until this process ends
    check_out(out, overwrite)  # again: a job that held it may have finished meanwhile
    if (partial / PLAN).is_file():
        if json.loads((partial / PLAN).read_text()) == plan:
            remove_unfinished(partial)  # a shard the crash interrupted
            return partial
        if not overwrite:
            raise DatasetError(
                f"{partial} holds an unfinished preparation with other inputs or settings; "
                "rerun that command to finish it, or pass --overwrite to discard it"
            )
        for leftover in partial.iterdir():
            if leftover.name != LOCK_FILE:
                leftover.unlink()
    atomic_write_text(partial / PLAN, json.dumps(plan, indent=1))
    return partial


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, a folder of other files, or (without ``overwrite``) a dataset."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} exists and is not a folder; choose another --out (nothing was changed)")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise DatasetError(
                f"--out {out} is a non-empty folder that is not a prepared dataset; choose another --out (nothing "
                "was changed)"
            )
        if not overwrite:
            raise DatasetError(
                f"--out {out} already holds a prepared dataset; pass --overwrite to replace it (the old one stays "
                "until the new one is complete)"
            )


def publish(partial: Path, out: Path) -> None:
    """Move the finished dataset into place; an old dataset there is removed only after the move. The lock file goes
    (its lock stays held until this process ends), so the dataset holds only its manifest and shards."""
    (partial / PLAN).unlink()
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old)
    else:
        os.rename(partial, out)
    (out / LOCK_FILE).unlink()


def _set_itk_threads(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _prepare_one(job: tuple[Source, Recipe, str]) -> dict[str, Any]:
    """Run in a worker: the prepared case, or the reason it was skipped. Never raises for one case's sake."""
    source, recipe, split = job
    try:
        case, warnings = prepare_case(source, recipe, split)
        return {"id": source.id, "case": case, "warnings": warnings}
    except CaseError as err:
        reason = str(err)
    except Exception as err:  # a case that breaks a library must not end the others
        reason = f"{source.image}: unexpected {type(err).__name__}: {err}"
    return {"id": source.id, "source": str(source.image), "reason": reason}


def ordered_map(fn: Callable[[Any], Any], jobs: Iterable[Any], processes: int) -> Iterator[Any]:
    """``fn`` over ``jobs`` on ``processes`` worker processes, in order, with at most 2 x processes in flight (so
    prepared volumes never pile up in memory). One process runs in this one."""
    if processes == 1:
        yield from map(fn, jobs)
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")  # ITK's thread pool does not survive fork
    with ProcessPoolExecutor(
        processes, context, initializer=_set_itk_threads, initargs=(max(1, cores // processes),)
    ) as pool:
        window: deque = deque()
        for job in jobs:
            window.append(pool.submit(fn, job))
            if len(window) >= 2 * processes:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def job_plan(recipe: Recipe, shards: list[list[Source]], splits: dict[str, str]) -> dict[str, Any]:
    """What a rerun must match to resume in the same workspace: the recipe, and each shard's cases with their splits
    and real paths."""
    return {
        "recipe": recipe.to_dict(),
        "shards": [
            [
                {
                    "id": s.id,
                    "split": splits[s.id],
                    "images": [_resolved(p) for p in s.images],
                    "label": _resolved(s.label),
                }
                for s in shard
            ]
            for shard in shards
        ],
    }


def write_shards(
    partial: Path, shards: list[list[Source]], splits: dict[str, str], recipe: Recipe, jobs: int, console: Console
) -> None:
    """Prepare the cases of every shard not yet in ``partial`` on ``jobs`` processes and write each shard as soon as
    its cases are done, so a crash loses at most the shard in hand. A case that fails is left out, named on the
    console, and noted with its reason in its shard, for the manifest."""
    todo = [i for i in range(len(shards)) if not (partial / shard_name(i)).is_file()]
    if len(todo) < len(shards):
        console.print(f"resuming in {partial}: {len(shards) - len(todo)} of {len(shards)} shards are already done")
    with progress_bar(console) as progress:
        task = progress.add_task(f"preparing {recipe.name}", total=sum(len(shards[i]) for i in todo), now="")
        results = ordered_map(_prepare_one, ((s, recipe, splits[s.id]) for i in todo for s in shards[i]), jobs)
        for index in todo:
            done, skipped, warnings = [], [], {}
            for _ in shards[index]:
                result = next(results)
                progress.update(task, advance=1, now=result["id"])
                if "case" in result:
                    done.append(result["case"])
                    if result["warnings"]:
                        warnings[result["id"]] = result["warnings"]
                else:
                    skipped.append({k: result[k] for k in ("id", "source", "reason")})
                    progress.console.print(f"[red]skipped[/] {result['id']}: {result['reason']}")
            write_shard(
                partial / shard_name(index),
                done,
                list(recipe.labels.classes),
                recipe.shards.compression,
                tuple(recipe.shards.chunks),
                channels=recipe.input.names,
                notes={"skipped": skipped, "warnings": warnings},
            )


def read_shards(partial: Path, count: int) -> tuple[list[dict], list[dict], list[dict], dict[str, list[str]]]:
    """The manifest's shard entries and case records, and the skipped cases and warnings, from the ``count`` shards'
    own notes (those written by an earlier, crashed run too); a shard whose every case was skipped is removed."""
    entries, records, skipped, warnings = [], [], [], {}
    for index in range(count):
        path = partial / shard_name(index)
        shard_records, notes = read_shard_notes(path)
        skipped += notes["skipped"]
        warnings.update(notes["warnings"])
        if shard_records:
            records += shard_records
            entries.append(shard_entry(path, [r["id"] for r in shard_records]))
        else:
            path.unlink()  # every case of this shard was skipped
    return entries, records, skipped, warnings


def prepare(
    recipe: Recipe,
    inputs: list[Path],
    out: Path,
    *,
    jobs: int,
    overwrite: bool,
    split_file: Path | None,
    console: Console,
    extra: dict[str, Any] | None = None,
) -> int:
    """Build the dataset; returns the exit status (0, or SOME_SKIPPED when some cases were skipped). ``extra``
    entries (plan's fingerprint) go into the manifest as they are."""
    require("SimpleITK", "prepare (reading scans)", "SimpleITK")  # before any work or worker process
    start = time.perf_counter()
    spec = recipe.input
    sources = find_cases(inputs, spec.layout, spec.image_patterns, spec.label)
    splits = assign_splits([s.id for s in sources], recipe.splits, split_file)
    shards = plan_shards(sources, splits, recipe.shards.cases_per_shard)
    partial = open_workspace(out, job_plan(recipe, shards, splits), overwrite)
    write_shards(partial, shards, splits, recipe, jobs, console)
    entries, records, skipped, warnings = read_shards(partial, len(shards))
    print_summary(console, records, skipped, warnings, entries, time.perf_counter() - start)
    if not records:
        shutil.rmtree(partial)
        raise DatasetError(f"no case of {', '.join(map(str, inputs))} could be prepared; nothing was written")
    manifest = new_manifest(
        recipe.name,
        recipe.modality,
        list(recipe.labels.classes),
        recipe.manifest_preprocessing(),
        entries,
        records,
    )
    write_manifest(partial, {**manifest, "skipped": skipped, "warnings": warnings, **(extra or {})})
    publish(partial, out)
    console.print(f"[bold green]wrote[/] {out}: {len(records)} cases in {len(entries)} shards")
    return SOME_SKIPPED if skipped else 0


def print_summary(
    console: Console,
    records: list[dict],
    skipped: list[dict],
    warnings: dict[str, list[str]],
    entries: list[dict],
    seconds: float,
) -> None:
    """Counts per split, then every skipped case and every warning with its reason."""
    per_split = {name: sum(r["split"] == name for r in records) for name in sorted({r["split"] for r in records})}
    size = sum(e["bytes"] for e in entries) / 1e6
    console.print(
        f"{len(records)} cases prepared ({', '.join(f'{n} {k}' for k, n in per_split.items()) or 'none'}), "
        f"{len(skipped)} skipped, {size:.1f} MB in {len(entries)} shards, {seconds:.1f} s"
    )
    if skipped:
        table = Table(title="skipped cases", title_justify="left")
        table.add_column("case")
        table.add_column("why")
        for item in skipped:
            table.add_row(item["id"], item["reason"])
        console.print(table)
    for case_id, lines in warnings.items():
        for line in lines:
            console.print(f"[yellow]warning[/] {case_id}: {line}")


def verify(root: Path, console: Console) -> int:
    problems = verify_dataset(root)
    for line in problems:
        console.print(f"[red]bad[/] {line}")
    if problems:
        return 1
    manifest = json.loads((root / MANIFEST).read_text())
    console.print(
        f"[green]ok[/]: {len(manifest['shards'])} shards of {root} match the manifest ({len(manifest['cases'])} cases)"
    )
    return 0
