"""Run by torchrun in tests: train with the real Trainer, then check every rank holds the same weights.

Also records which sample keys each rank drew in the first epoch, so the test can check the shards.
"""

import json
import sys

import torch
import torch.distributed as dist

from unet3d_dist.config import load_config
from unet3d_dist.dist import gather_to_main, runtime
from unet3d_dist.trainer import Trainer


def main() -> None:
    """A function, so that the trainer (and DDP, which holds the process group) is gone before the group is."""
    cfg = load_config(None, sys.argv[2:])
    with runtime(cfg.train.device, 60) as env:
        trainer = Trainer(cfg, env)
        trainer.sampler.set_epoch(0)
        keys = list(trainer.sampler)
        code = trainer.train()
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(env.world_size)]
        dist.all_gather(gathered, flat)
        all_keys = gather_to_main(keys)
        del trainer
        if env.is_main:
            report = {
                "exit_code": code,
                "world_size": env.world_size,
                "identical": all(torch.equal(gathered[0], g) for g in gathered[1:]),
                "max_difference": max(float((gathered[0] - g).abs().max()) for g in gathered[1:]),
                "keys": all_keys,
            }
            with open(sys.argv[1], "w") as fh:
                json.dump(report, fh)


main()
