"""The Trainer: one run on one rank, read top to bottom as train -> train_epoch -> TrainStep, validation, checkpoints.

Used by the train command (``training.py``) and the benchmarks; it takes a Config and the DistEnv it runs in.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .batching import accumulation, check_divides, chunks
from .checkpoint import (
    Checkpoint,
    Checkpointer,
    CheckpointError,
    dataset_entry,
    read_checkpoint,
    rng_state,
    seed_rngs,
    set_rng_state,
    training_checkpoint,
)
from .config import Config, ConfigError
from .crop_classes import CropClasses
from .crop_keys import CropKeyLog, forget_after
from .data.crops import EpochSampler, padding_note, training_loader
from .data.device_augment import finish_batch
from .data.resident import ResidentLoader, resident_bytes, resident_reason
from .data.shards import DatasetError
from .data.source import open_dataset
from .data.splits import run_cases
from .dist import (
    DistEnv,
    RankVote,
    any_rank,
    barrier,
    broadcast_from_main,
    default_workers,
    elastic_world_sizes,
    gather_to_main,
    mean_over_ranks,
    on_main,
)
from .exit_codes import REQUEUE, BadInput
from .files import OutputError
from .layout import choose_channels_last
from .logger import RunLogger, new_run_id
from .model import build_model, count_parameters, forward_flops, to_channels_last
from .peers import ERROR_MARKER
from .precision import amp_name, resolve_amp
from .results import mean_metrics
from .run_lock import hold_folder
from .scoring import ScoringOptions, default_metric_workers, score_cases
from .segmenter import Segmenter
from .step import TrainStep
from .stop import StopRequest

REQUEUE_EXIT_CODE = REQUEUE  # stopped by a signal after a checkpoint; run the same command again to resume
STOP_MARKER = "stopped_by_signal.json"  # tells launch scripts, which only see torchrun's exit code, to requeue


class NonFiniteLossError(BadInput, RuntimeError):
    """Training produced too many non-finite losses in a row."""


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_dice: float = -1.0
    nonfinite_in_row: int = 0
    world_size: int = 0  # the ranks training now, so the ranks that wrote a checkpoint (0: older checkpoints)
    global_batch: int = 0  # crops per optimizer step, fixed for the run (0: older checkpoints, world_size x batch)
    samples_in_epoch: int = 0  # the position in the epoch's global crop order: step_in_epoch x global_batch


class Trainer:
    """Owns the model, optimizer, data and checkpoints of one run on one rank."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.stop = StopRequest()  # first, so that a signal during set-up is a stop too, and before workers fork
        self.run_dir = cfg.run_dir
        self.hold_run_dir()
        self.dataset = open_dataset(cfg.data, env)
        if cfg.inference.largest_component == "auto":  # the dataset's advice, recorded in every checkpoint
            cfg.inference.largest_component = self.dataset.largest_component
        self.train_ids = run_cases(self.dataset, cfg.data, "train")
        self.val_ids = run_cases(self.dataset, cfg.data, "val")
        if not self.train_ids:
            raise DatasetError(
                f"dataset {self.dataset.root} has no cases in split {cfg.data.train_split!r} (data.train_split); "
                f"its splits are: {', '.join(self.dataset.splits())}"
            )

        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last)
        if env.is_main:
            self.checkpointer.remove_unfinished()
        resume_from = self.resume_path()
        checkpoint = read_checkpoint(resume_from, resume=True) if resume_from else None
        self.model = self.make_model(checkpoint.cfg if checkpoint else None)
        self.global_batch = self.resolve_global_batch(checkpoint)
        self.accumulate = accumulation(self.global_batch, cfg.train.batch_size, env.world_size)
        sampler_of = (cfg.data.samples_per_epoch, env.world_size, env.rank, cfg.train.seed, cfg.train.batch_size)
        self.sampler = EpochSampler(*sampler_of, self.global_batch)
        self.steps_per_epoch = self.sampler.steps
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.samples_per_epoch={cfg.data.samples_per_epoch} gives no full global batch of "
                f"{self.global_batch} crops; raise data.samples_per_epoch"
            )
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.step = TrainStep(self.model, cfg, env.device, self.total_steps)
        self.crop_classes = CropClasses(self.dataset.classes, env.device)
        self.state = TrainState(world_size=env.world_size, global_batch=self.global_batch)
        self.resume_changes: list[str] = []
        self.resumed_world = env.world_size  # the ranks that wrote the checkpoint resumed from
        self.run_id = self.restore(checkpoint)  # before DDP, so every rank starts from the same weights
        self.step.nonfinite_run.fill_(self.state.nonfinite_in_row)
        self.step.net = self.wrapped_model()
        self.loader = self.make_loader()
        self.crop_keys = self.make_crop_key_log() if cfg.log.crop_keys else None
        self.logger = RunLogger(env.is_main, self.run_dir, resumed_step=self.state.global_step)
        if not self.complete:
            self.logger.start_wandb(cfg.log.wandb, cfg.log.wandb_project, cfg.log.run_name, self.run_id, cfg.to_dict())

    def make_loader(self) -> Iterable:
        """The batches' source: the resident cases on the device (data/resident.py; every rank takes the first rank's
        choice), else loader workers whose crop parts ``batches()`` finishes on the device when augment_device says."""
        cfg, env = self.cfg, self.env
        size = resident_bytes(self.dataset, self.train_ids)
        choice = resident_reason(cfg.data.resident, env.device, size, cfg.data.augment_device) if env.is_main else None
        resident = broadcast_from_main(choice)
        mode = cfg.data.augment_device
        on_device = mode == "device" or (mode == "auto" and env.device.type == "cuda")
        self.finish_on_device = resident is None and on_device
        if resident is not None:
            if env.is_main:
                print(f"data: resident on {env.device} ({size / 1e6:.0f} MB of train cases; {resident})")
            return ResidentLoader(self.dataset, self.train_ids, cfg, self.sampler, env.device)
        workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_workers(env)
        return training_loader(
            self.dataset,
            self.train_ids,
            cfg,
            self.sampler,
            workers,
            self.finish_on_device,
            env.device.type == "cuda",
            self.stop.worker_init,
        )

    def make_crop_key_log(self) -> CropKeyLog:
        """log.crop_keys: the first rank forgets the steps being redone before any rank appends."""
        if self.env.is_main:
            forget_after(self.run_dir, self.state.global_step)
        barrier()
        return CropKeyLog(self.run_dir, self.env.rank, self.env.world_size)

    def resolve_global_batch(self, checkpoint: Checkpoint | None) -> int:
        """The run's global batch: its checkpoint's (older ones: their world size x batch), else train.global_batch,
        else batch x world size; refused in one sentence if it does not divide over this run's ranks."""
        cfg, env = self.cfg, self.env
        configured, batch = cfg.train.global_batch, cfg.train.batch_size
        if checkpoint is not None:
            configured = checkpoint.global_batch(batch, configured)
        global_batch = configured or batch * env.world_size
        check_divides(global_batch, batch, env.world_size)
        sizes = elastic_world_sizes()  # a node range: refused now rather than at the restart that cannot continue
        job = f"this job's node range (world sizes {', '.join(map(str, sizes))})"
        for size in sizes:
            check_divides(global_batch, batch, size, job)
        cfg.train.global_batch = global_batch  # recorded with the run
        return global_batch

    def make_model(self, saved: Config | None) -> nn.Module:
        """The seeded model on the device, in the memory format ``train.channels_last`` resolves to (layout.py):
        a resumed run keeps the format its checkpoint records, and every rank takes the first rank's choice."""
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, in_channels=len(self.dataset.channels), num_classes=self.dataset.num_classes)
        model = model.to(env.device)
        if cfg.model.norm == "batch" and env.multi_rank:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        setting = cfg.train.channels_last
        if setting == "auto" and saved is not None:
            setting = saved.train.channels_last
        choice = None
        if env.is_main:
            amp_dtype = resolve_amp(cfg.train.amp, env.device, crop=cfg.data.crop)
            choice = choose_channels_last(setting, env.device, cfg.model.widths[0], cfg.model.norm, amp_dtype)
        channels_last, self.layout_reason = broadcast_from_main(choice)
        if saved is not None and cfg.train.channels_last == "auto":
            self.layout_reason = f"auto: {setting}, as the checkpoint records"
        cfg.train.channels_last = "on" if channels_last else "off"
        return to_channels_last(model) if channels_last else model

    def wrapped_model(self) -> nn.Module:
        """What runs the forward pass: the model in DDP across ranks, compiled where ``train.compile`` says."""
        cfg, env, net = self.cfg, self.env, self.model
        if env.multi_rank:
            net = DistributedDataParallel(
                net, device_ids=[env.device.index] if env.device.type == "cuda" else None, gradient_as_bucket_view=True
            )
        self.compiled = cfg.train.compile == "on" or (cfg.train.compile == "auto" and env.device.type == "cuda")
        return torch.compile(net, backend=cfg.train.compile_backend) if self.compiled else net

    @property
    def complete(self) -> bool:
        """The run's last epoch is trained, validated and checkpointed: there is nothing left to do."""
        return self.state.epoch >= self.cfg.train.epochs

    def train(self) -> int:
        """Run to the last epoch; return 0, or REQUEUE_EXIT_CODE after a signal-triggered checkpoint."""
        cfg = self.cfg
        if self.complete:
            self.logger.info(
                f"run {self.run_dir} is already complete ({self.state.global_step} steps, {cfg.train.epochs} epochs; "
                f"{self.best_text()}); nothing was changed. Raise train.epochs to train it further, or choose "
                "another log.run_name for a new run"
            )
            return 0
        self.announce()
        self.logger.begin_progress(self.total_steps, self.state.global_step)
        first_epoch = self.state.epoch
        for epoch in range(first_epoch, cfg.train.epochs):
            if not self.train_epoch(epoch):
                return self.stop_for_requeue()
            self.crop_classes.end_epoch(self.logger, self.state.global_step, epoch + 1, show=epoch == first_epoch)
            last = epoch + 1 == cfg.train.epochs
            is_best = False
            if cfg.train.val_every and ((epoch + 1) % cfg.train.val_every == 0 or last):
                is_best = self.validate()
                if is_best is None:  # stopped: the checkpoint holds the epoch, whose validation the resume runs
                    return self.stop_for_requeue()
            self.state.epoch, self.state.step_in_epoch, self.state.samples_in_epoch = epoch + 1, 0, 0
            self.save_checkpoint(is_best)
            if not last and any_rank(self.stop.requested):
                return self.stop_for_requeue(checkpoint_saved=True)
        self.finish()
        return 0

    def train_epoch(self, epoch: int) -> bool:
        """Train the rest of one epoch; False if a stop was requested (on any rank)."""
        cfg = self.cfg
        self.sampler.set_epoch(epoch, skip=self.state.samples_in_epoch)
        loss_sum = torch.zeros((), device=self.env.device)
        interval_start, interval_steps = time.perf_counter(), 0
        stop_vote = None  # cast after one step, read after the next: the ranks agree without waiting for each other
        keys = chunks(chunks(self.sampler, cfg.train.batch_size), self.accumulate) if self.crop_keys else None
        for micro_batches in chunks(self.batches(), self.accumulate):
            if keys is not None:  # the sampler's keys in the order the loader delivers their crops
                self.crop_keys.add(self.state.global_step + 1, next(keys))
            loss_sum += self.step.accumulate(micro_batches)
            for _, label in micro_batches:
                self.crop_classes.add(label)
            self.state.step_in_epoch += 1
            self.state.global_step += 1
            self.state.samples_in_epoch = self.state.step_in_epoch * self.global_batch
            interval_steps += 1
            status = None
            if self.state.global_step % cfg.log.every_steps == 0 or self.state.step_in_epoch == self.steps_per_epoch:
                status = self.log_train(loss_sum / interval_steps, interval_steps, time.perf_counter() - interval_start)
                loss_sum.zero_()
                interval_start, interval_steps = time.perf_counter(), 0
            self.logger.advance(f"epoch {epoch + 1}/{cfg.train.epochs}", status)
            every = cfg.checkpoint.every_steps
            if every and self.state.global_step % every == 0 and self.state.step_in_epoch < self.steps_per_epoch:
                self.save_checkpoint()
            if stop_vote is not None and stop_vote.result():
                return False
            stop_vote = RankVote(self.stop.requested)
        return not (stop_vote is not None and stop_vote.result())

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The loader's batches as (image, label) on the training device (finished there if the workers left it; the
        resident loader's come finished)."""
        for batch in self.loader:
            image, label = finish_batch(batch, self.cfg.data.crop, self.env.device) if self.finish_on_device else batch
            yield image.to(self.env.device, non_blocking=True), label.to(self.env.device, non_blocking=True)

    def announce(self) -> None:
        cfg, env = self.cfg, self.env
        if not env.is_main:
            return
        flops = forward_flops(self.model, cfg.data.crop, len(self.dataset.channels))
        self.logger.info(
            f"[bold]unet3d-dist[/] run [cyan]{self.run_dir}[/]  world={env.world_size}  device={env.device.type}  "
            f"amp={amp_name(self.step.amp_dtype)}\n"
            f"model: ResUNet3D widths={list(cfg.model.widths)} norm={cfg.model.norm}  "
            f"{count_parameters(self.model) / 1e6:.2f} M parameters, {flops / 1e9:.3g} GFLOP forward per "
            f"{'x'.join(map(str, cfg.data.crop))} crop\n"
            f"layout: channels_last_3d {cfg.train.channels_last} ({self.layout_reason})  compile: "
            f"{cfg.train.compile_backend if self.compiled else 'off'} (train.compile={cfg.train.compile})\n"
            f"data: {self.dataset.root} ({len(self.train_ids)} train / {len(self.val_ids)} val cases)  "
            f"global batch {self.global_batch} = {self.batch_text()}, "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps"
        )
        shapes = {case: self.dataset.records[case]["shape"] for case in self.train_ids}
        if note := padding_note(shapes, cfg.data.crop):
            self.logger.info(f"data: {note}")
        if self.state.global_step and self.resumed_world != env.world_size:
            self.logger.info(
                f"resumed at step {self.state.global_step} on {env.world_size} rank(s) (was {self.resumed_world}): "
                f"{self.batch_text()}; the same crops in the same groups every step, the LR schedule unchanged"
            )
        elif self.state.global_step:
            self.logger.info(f"resumed at epoch {self.state.epoch + 1}, step {self.state.global_step}")
        if self.resume_changes:
            self.logger.info(
                "[yellow]settings differ from the checkpoint's; the saved optimizer and LR schedule are restored "
                "as they were (so optim.* changes other than the schedule length do not apply):\n  "
                + "\n  ".join(self.resume_changes)
            )

    def health(self) -> torch.Tensor:
        """[non-finite steps in a row, 1 if every weight is finite] on the device: one reduction, no host sync."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        return torch.stack([self.step.nonfinite_run.double(), finite.double()])

    def batch_text(self) -> str:
        """How the global batch is split: crops per rank, and the micro-batches each rank accumulates."""
        batch, world = self.cfg.train.batch_size, self.env.world_size
        micro = f" ({self.accumulate} micro-batches of {batch})" if self.accumulate > 1 else ""
        return f"{self.global_batch // world} crop(s) per rank{micro} x {world} rank(s)"

    def check_finite(self, readings: list[float] | None = None) -> None:
        """Stop after train.max_nonfinite non-finite steps in a row, and never checkpoint non-finite weights.

        TrainStep skips non-finite steps in every precision; many in a row mean divergence, which this check reports
        within one logging interval, before any checkpoint could store it (as it does weights that overflowed).
        ``readings`` are ``health()``'s values when the caller read them already (in its one host sync).
        """
        nonfinite_in_row, weights_finite = readings if readings is not None else self.health().tolist()
        self.state.nonfinite_in_row = int(nonfinite_in_row)
        if self.state.nonfinite_in_row >= self.cfg.train.max_nonfinite or not weights_finite:
            raise NonFiniteLossError(
                f"{self.state.nonfinite_in_row} non-finite steps in a row by step {self.state.global_step}"
                f"{'' if weights_finite else ' and the weights are no longer finite'}; the last good checkpoint in "
                f"{self.checkpointer.dir} is intact (try a lower optim.lr or train.amp=off)"
            )

    def log_train(self, mean_loss: torch.Tensor, steps: int, seconds: float) -> str:
        """Average the interval's loss over ranks and log it, with the gradient norm and the finite checks read in
        the interval's one host sync."""
        loss = mean_over_ranks(mean_loss.detach()).double()
        loss, grad_norm, *readings = torch.cat([loss[None], self.step.grad_norm.double()[None], self.health()]).tolist()
        self.check_finite(readings)
        lr = self.step.optimizer.param_groups[0]["lr"]
        crops_per_s = steps * self.global_batch / max(seconds, 1e-9)
        self.logger.log(
            self.state.global_step,
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/crops_per_s": crops_per_s,
                "train/grad_norm": grad_norm,
            },
        )
        return f"loss {loss:.4f}  lr {lr:.2e}  {crops_per_s:.2f} crops/s"

    def validate(self) -> bool | None:
        """The evaluator on the validation split, distributed over ranks; True if its mean Dice is the best so far,
        None if a stop signal ended it early (each rank stops after its current batch of windows).

        Dice (and Jaccard) only by default; train.val_distances adds the surface distances, scored in worker processes.
        """
        if not self.val_ids:
            return False
        cfg, distances = self.cfg, self.cfg.train.val_distances
        options = ScoringOptions(
            distances=distances, metric_workers=default_metric_workers(default_workers(self.env)) if distances else 0
        )
        segmenter = Segmenter.for_validation(
            self.model,
            cfg,
            self.dataset.classes,
            self.env.device,
            amp_dtype=self.step.amp_dtype,
            stop_requested=lambda: self.stop.requested,
        )
        records = score_cases(segmenter, self.dataset, self.val_ids, self.env, options)
        if any_rank(self.stop.requested):
            return None
        means = broadcast_from_main(mean_metrics(records) if records is not None else None)
        self.logger.log(self.state.global_step, {f"val/{name}": value for name, value in means.items()})
        mean_dice = means["dice"]
        is_best = mean_dice > self.state.best_dice
        if is_best:
            self.state.best_dice = mean_dice
        hd95 = f", HD95 {means['hd95_mm']:.2f} mm" if distances else ""
        self.logger.info(
            f"epoch {self.state.epoch + 1}: validation Dice {mean_dice:.4f}{hd95} (best {self.state.best_dice:.4f})"
        )
        return is_best

    def stop_for_requeue(self, checkpoint_saved: bool = False) -> int:
        """Checkpoint, leave the marker for launch scripts, and return the requeue exit code."""
        if not checkpoint_saved:
            self.save_checkpoint()
        self.logger.end_progress()
        if self.env.is_main:
            marker = {"signal": self.stop.signal_name, "step": self.state.global_step, "exit_code": REQUEUE_EXIT_CODE}
            (self.run_dir / STOP_MARKER).write_text(json.dumps(marker) + "\n")
        barrier()  # no rank exits before the marker exists, so the launcher on every node finds it
        self.logger.finish()  # before the last line: wandb's own lines, if any, come first
        self.logger.info(
            f"[yellow]stopped by {self.stop.signal_name or 'a signal on another rank'} at step "
            f"{self.state.global_step}; checkpoint saved; exit code {REQUEUE_EXIT_CODE} (run the same command to "
            "resume)"
        )
        return REQUEUE_EXIT_CODE

    def finish(self) -> None:
        self.logger.end_progress()
        if self.env.is_main:
            from .report import plot_loss_curve  # matplotlib costs ~1 s to import; only the end of a run needs it

            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")
            self.logger.info(
                f"[bold green]done[/]: {self.state.global_step} steps; {self.best_text()}; "
                f"checkpoints in {self.checkpointer.dir}; loss curve {self.run_dir / 'loss_curve.png'}"
            )
        self.logger.finish()

    def best_text(self) -> str:
        if not self.val_ids:
            return "no validation cases, so no best.pt"
        return f"best validation Dice {self.state.best_dice:.4f}"

    def hold_run_dir(self) -> None:
        """Rank 0 locks the run directory for the whole run (run_lock); every rank refuses if another job has it or
        it cannot be written."""
        what = f"run directory {self.run_dir}"
        hold = functools.partial(hold_folder, self.run_dir, what, "choose another log.run_name", "log.runs_dir")
        self.run_dir_lock = on_main(self.env, hold, (OutputError,))

    def save_checkpoint(self, is_best: bool = False) -> None:
        """Gather every rank's RNG state, then rank 0 writes the file."""
        self.check_finite()
        rngs = gather_to_main(rng_state(self.env.device))
        if self.env.is_main:
            entry = dataset_entry(self.dataset)
            state = training_checkpoint(self.step, asdict(self.state), rngs, self.cfg, entry, self.run_id)
            self.checkpointer.save(state, self.state.global_step, is_best)
        barrier()

    def resume_path(self) -> Path | None:
        """The checkpoint train.resume names (auto: the run's latest), or None for a new run."""
        resume = self.cfg.train.resume
        if resume == "never" and self.checkpointer.latest() is not None:
            raise CheckpointError(
                f"train.resume=never but {self.checkpointer.dir} already holds checkpoints; choose another "
                "log.run_name or move that run away (nothing was overwritten)"
            )
        return None if resume == "never" else self.checkpointer.latest() if resume == "auto" else Path(resume)

    def restore(self, checkpoint: Checkpoint | None) -> str:
        """Load the checkpoint into the step; return the logging run id (a new one for a new run)."""
        if checkpoint is None:
            if self.env.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.cfg.dump(self.run_dir / "config.yaml")
            return broadcast_from_main(new_run_id() if self.env.is_main else None)
        if self.env.is_main:
            for marker in (STOP_MARKER, ERROR_MARKER):  # of the attempt this one resumes
                (self.run_dir / marker).unlink(missing_ok=True)
        changes = checkpoint.resume_changes(self.cfg, dataset_entry(self.dataset))
        resolved = ("train.resume", "train.global_batch")  # the resume line says what the global batch does
        self.resume_changes = [line for line in changes if not line.startswith(resolved)]
        world = checkpoint.world_size
        train_state, rngs, notes = checkpoint.restore_into(self.step)
        self.resume_changes += notes
        if "global_batch" not in train_state and world > 1 and train_state["step_in_epoch"]:
            self.resume_changes.append(
                "this checkpoint predates the crop order that no world size changes: the rest of its epoch follows "
                "the new order and epoch length (floor(data.samples_per_epoch / global batch) steps), so some of "
                "the epoch's crops repeat and others are skipped; later epochs are exact"
            )
        self.resumed_world = world
        samples = train_state.get("samples_in_epoch", train_state["step_in_epoch"] * self.global_batch)
        now = {"world_size": self.env.world_size, "global_batch": self.global_batch, "samples_in_epoch": samples}
        self.state = TrainState(**{**train_state, **now})
        if self.env.rank < len(rngs):
            set_rng_state(rngs[self.env.rank], self.env.device)
        else:  # a rank the checkpoint's run did not have (states of ranks that are gone are dropped)
            seed_rngs(self.cfg.train.seed, self.state.global_step, self.env.rank)
        if self.env.is_main and not self.complete:  # a finished run's files stay as they are
            self.cfg.dump(self.run_dir / "config.yaml")
        return checkpoint.run_id
