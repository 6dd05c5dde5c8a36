"""Fast unit tests of the pure functions that the end-to-end runs only cover from afar."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from unet3d_dist.checkpoint import Checkpointer, config_differences
from unet3d_dist.config import Config, OptimConfig
from unet3d_dist.data.splits import fold_assignment
from unet3d_dist.files import atomic_write_text, remove_unfinished
from unet3d_dist.optim import lr_factor
from unet3d_dist.preparation.build import assign_splits, plan_shards
from unet3d_dist.preparation.layouts import Source
from unet3d_dist.preparation.recipe import SplitSpec
from unet3d_dist.scoring import balanced_shards
from unet3d_dist.stop import StopRequest
from unet3d_dist.windows import window_starts


def test_poly_decay_starts_at_one_ends_at_zero_and_stays_there():
    factor = lr_factor(OptimConfig(schedule="poly", poly_power=0.9), total_steps=100)
    assert factor(0) == 1.0 and factor(100) == 0.0 and factor(150) == 0.0
    assert factor(50) == pytest.approx(0.5**0.9)
    assert all(factor(s) > factor(s + 1) for s in range(100))


def test_step_and_constant_schedules():
    step = lr_factor(OptimConfig(schedule="step", step_every=10, step_gamma=0.1), total_steps=100)
    assert [step(s) for s in (0, 9, 10, 25)] == pytest.approx([1, 1, 0.1, 0.01])
    assert lr_factor(OptimConfig(schedule="constant"), 100)(99) == 1.0


def test_balanced_shards_give_every_case_to_exactly_one_rank():
    sizes = {f"c{i}": size for i, size in enumerate([100, 90, 50, 40, 30, 5])}
    for world in (1, 2, 3, 8):
        shards = balanced_shards(sizes, world)
        assert len(shards) == world and sorted(c for s in shards for c in s) == sorted(sizes)
    two = balanced_shards(sizes, 2)
    loads = [sum(sizes[c] for c in s) for s in two]
    assert max(loads) - min(loads) <= max(sizes.values())  # largest first, to the lightest rank
    assert balanced_shards(sizes, 2) == two  # the same cases on the same rank every time


@pytest.mark.parametrize(("size", "patch", "overlap"), [(100, 32, 0.5), (64, 64, 0.5), (20, 32, 0.5), (97, 16, 0.25)])
def test_window_starts_cover_the_volume_with_the_overlap(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == max(0, size - patch)
    assert all(b - a <= patch * (1 - overlap) for a, b in zip(starts, starts[1:]))  # neighbours overlap enough
    assert starts == sorted(set(starts))


def test_folds_partition_the_cases_evenly_whatever_their_order():
    ids = [f"case{i:02d}" for i in range(14)]
    assignment = fold_assignment(ids, 5)
    assert sorted(assignment) == ids and fold_assignment(list(reversed(ids)), 5) == assignment
    sizes = [list(assignment.values()).count(k) for k in range(5)]
    assert max(sizes) - min(sizes) <= 1


def test_split_assignment_from_fractions_keeps_a_training_case_and_is_seeded():
    ids = [f"c{i}" for i in range(10)]
    splits = assign_splits(ids, SplitSpec(train=0.6, val=0.2, test=0.2, seed=1), None)
    assert [list(splits.values()).count(s) for s in ("train", "val", "test")] == [6, 2, 2]
    assert assign_splits(ids, SplitSpec(train=0.6, val=0.2, test=0.2, seed=1), None) == splits
    tiny = assign_splits(["a", "b"], SplitSpec(train=0.1, val=0.9, test=0.0), None)
    assert "train" in tiny.values()


def test_shard_planning_groups_by_split_then_id():
    sources = [Source(i, (Path(i),), Path(i), "folders") for i in ("e", "d", "c", "b", "a")]
    splits = {"a": "test", "b": "train", "c": "val", "d": "train", "e": "extra"}
    plan = plan_shards(sources, splits, per_shard=2)
    assert [[s.id for s in shard] for shard in plan] == [["b", "d"], ["c", "a"], ["e"]]


def test_config_differences_name_every_changed_key():
    saved, current = Config().to_dict(), Config()
    current.optim.lr, current.model.norm = 0.02, "batch"
    lines = config_differences(saved, current.to_dict(), ("optim", "model"))
    assert lines == ["optim.lr: 0.01 -> 0.02", "model.norm: 'group' -> 'batch'"]
    assert config_differences(saved, saved, ("optim", "model")) == []


def test_checkpoints_keep_the_last_k_and_best_and_never_offer_a_temporary_file(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    for step in (5, 10, 15):
        checkpointer.save({"step": torch.tensor(step)}, step, is_best=step == 10)
    names = sorted(p.name for p in checkpointer.dir.iterdir())
    assert names == ["best.pt", "ckpt-00000010.pt", "ckpt-00000015.pt"]
    (checkpointer.dir / ".tmp-123-ckpt-00000020.pt").write_bytes(b"half a file")  # a writer killed mid-write
    assert checkpointer.latest().name == "ckpt-00000015.pt"
    checkpointer.remove_unfinished()
    assert not list(checkpointer.dir.glob(".tmp-*"))


def test_atomic_text_and_unfinished_leftovers(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    (tmp_path / ".tmp-9-b.json").write_text("{")
    remove_unfinished(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.fixture
def stop_request():
    """A real StopRequest in this process; the previous handlers come back afterwards."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield StopRequest()
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_a_stop_signal_is_remembered_not_acted_on(stop_request):
    assert not stop_request.requested and stop_request.signal_name is None
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # the first one names the stop
    assert stop_request.requested and stop_request.signal_name == "SIGUSR1"


def test_a_repeated_ctrl_c_within_a_second_is_one_press_and_a_later_one_stops_at_once(stop_request):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)  # torchrun's forward of the same press
    assert stop_request.signal_name == "SIGINT"
    stop_request._own_at -= 2  # the user presses again two seconds later
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_a_worker_hands_its_signal_to_the_rank(stop_request):
    shared = stop_request._shared
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        stop_request.worker_init(0)  # as in a DataLoader worker: this process now plays the worker
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert shared[0] == signal.SIGTERM and stop_request.requested and stop_request.signal_name == "SIGTERM"


def test_panel_slices_cut_through_the_structure_even_where_its_centre_of_mass_is_outside():
    import numpy as np

    from unet3d_dist.report import focus_slices

    ring = np.zeros((40, 40, 10), bool)
    ring[5:35, 5:35, 3:7] = True
    ring[10:30, 10:30, :] = False  # a square ring: its centre of mass (x = y = 19.5) is in the hole
    x, y, z = focus_slices(ring, ring.shape)
    assert ring[x].any() and ring[:, y].any() and ring[:, :, z].any()
    assert focus_slices(None, (8, 6, 4)) == [4, 3, 2]


def test_slurm_task_counts_per_node_expand_from_their_compressed_form():
    from unet3d_dist.dist import tasks_per_node

    assert (
        tasks_per_node("4") == [4]
        and tasks_per_node("2(x3),1") == [2, 2, 2, 1]
        and tasks_per_node("1,3(x2)") == [1, 3, 3]
    )


def test_a_local_rank_gets_its_own_gpu_or_the_only_one_it_sees():
    from unet3d_dist.dist import gpu_index

    assert [gpu_index(rank, 4) for rank in range(4)] == [0, 1, 2, 3]  # torchrun: all of the node's GPUs visible
    assert gpu_index(3, 1) == 0  # srun --gpus-per-task=1: each task sees its own GPU as cuda:0
    with pytest.raises(RuntimeError, match="local rank 2 has no GPU: 2 are visible to it"):
        gpu_index(2, 2)


def test_rng_states_of_any_gpu_visibility_restore_on_this_device():
    from unet3d_dist.checkpoint import rng_state, set_rng_state

    cpu = torch.device("cpu")
    state = rng_state(cpu)
    assert state["cuda"] is None  # only this rank's own device is saved
    expected = torch.rand(3)
    old_format = {**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}  # every visible GPU, as before
    set_rng_state(old_format, cpu)
    assert torch.equal(torch.rand(3), expected)


def test_loader_workers_follow_the_cpus_the_job_has_per_rank_without_a_cap():
    from unet3d_dist.dist import workers_for

    assert workers_for(affinity=64, slurm_cpus=32, ranks_sharing=4) == 7  # 32 CPUs for 4 torchrun ranks
    assert workers_for(affinity=128, slurm_cpus=None, ranks_sharing=1) == 127  # no cap at 4 any more
    assert workers_for(affinity=2, slurm_cpus=None, ranks_sharing=2) == 1  # at least one
    assert workers_for(affinity=16, slurm_cpus=8, ranks_sharing=1) == 7  # srun task: its own CPUs


def test_a_resume_forgets_later_lines_and_a_line_a_kill_cut_short(tmp_path):
    from unet3d_dist.files import forget_lines_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 6)) + '{"step": 6, "lo')
    forget_lines_after(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
