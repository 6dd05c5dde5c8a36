"""Does a training step make the host wait for the device? Counted on the real Trainer, batches included.

A GPU step of a few milliseconds is only as fast as the queue in front of it: one ``.item()``, ``bool()`` of a
tensor or blocking copy per step and the host waits for the step already queued before it can queue the next. On
CUDA the steps run under ``torch.cuda.set_sync_debug_mode("error")``, which raises at the first synchronising call.
On the CPU nothing waits, but the same host reads show in the profiler as ``aten::_local_scalar_dense`` (what
``.item()``, ``bool()`` and ``int()`` of a tensor call), so the CPU proves the code path the GPU will run.
"""

from __future__ import annotations

import itertools

import torch

from ..batching import chunks
from ..trainer import Trainer

HOST_READ = "aten::_local_scalar_dense"


def host_reads_in_steps(trainer: Trainer, steps: int = 5, warmup: int = 2) -> list[str]:
    """Train ``steps`` steps (after ``warmup``: cuDNN's choice of kernels and the allocator's first growth may wait)
    as ``train_epoch`` does between its logging intervals (batches, micro-batches accumulated to the global batch,
    the class counts), and return what made the host wait: empty when nothing did."""
    trainer.sampler.set_epoch(0)
    steps_of = chunks(trainer.batches(), trainer.accumulate)

    def train(count: int) -> None:
        for micro_batches in itertools.islice(steps_of, count):
            trainer.step.accumulate(micro_batches)
            for _, label in micro_batches:
                trainer.crop_classes.add(label)

    train(warmup)
    if trainer.env.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            train(steps)
        except RuntimeError as err:
            return [str(err).splitlines()[0]]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        train(steps)
    return [event.name for event in profile.events() if event.name == HOST_READ]
