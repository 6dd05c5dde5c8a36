"""Dispatch ``python -m unet3d_dist.bench <part>`` to ``unet3d_dist.bench.<part>.main(argv)``."""

import importlib
import sys

PARTS = {  # what each part measures, and against which reference of the same run
    "train_step": "ms/step and FLOP rate of the training step (AMP, channels_last, compile, heap) vs a conv3d peak",
    "pipeline": "the real training loop (loader + step) against the pure step on tensors in memory: the data wait",
    "data": "crops/s per loader worker and bytes read per crop for each chunk layout, with and without checksums",
    "loader": "crops/s of one worker at a recipe's crop and augmentation (cpu or device path), workers a GPU needs",
    "eval": "sliding window and metrics against MONAI and medpy; stitching memory, whole volume against slabs",
    "ddp": "2 DDP ranks against 2 independent processes, and the gradient all-reduce alone",
    "checkpoint": "atomic checkpoint save and load against torch.save to memory",
    "gpu": "the device check (launch/gpu_check.sh): conv peaks, the bf16 step, host syncs, data paths, quickstart",
}


def usage() -> str:
    width = max(map(len, PARTS))
    lines = [f"  {name:<{width}}  {what}" for name, what in PARTS.items()]
    return "\n".join(
        ["usage: python -m unet3d_dist.bench PART [options]   (PART --help for its options)", "parts:", *lines]
    )


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    part = sys.argv[1].replace("-", "_")
    if part not in PARTS:
        print(f"unknown part {sys.argv[1]!r}\n{usage()}", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(f"unet3d_dist.bench.{part}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
