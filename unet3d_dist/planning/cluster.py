"""Data-parallel runs on a cluster, predicted with the scaling model of docs/PERFORMANCE.md.

Each step all-reduces the fp32 gradients once. Ring inside a node (NVLink: 150 GB/s bus bandwidth, 5 us a hop);
NCCL's tree across nodes (InfiniBand HDR: 12 GB/s per GPU, 10 us a level). Efficiency = t_step / (t_step + t_ar),
pessimistic since DDP overlaps the all-reduce with backward.
"""

from __future__ import annotations

import math

GPUS_PER_NODE = 8
NODE_BANDWIDTH, NODE_LATENCY = 150e9, 5e-6
NETWORK_BANDWIDTH, NETWORK_LATENCY = 12e9, 10e-6
GPU_TFLOPS = 50.0  # achieved bf16 rate assumed for a GPU step when none was measured (35-70 on H100-class GPUs)
GPU_STEP_FLOOR_S = 0.005  # and at least this: some 300 kernel launches a step, forward, backward and optimizer


def predicted_gpu_step(forward_flops: float, batch: int) -> float:
    """Seconds of a training step on a GPU: backward costs twice the forward."""
    return max(GPU_STEP_FLOOR_S, 3 * forward_flops * batch / (GPU_TFLOPS * 1e12))


def allreduce_seconds(parameters: int, gpus: int) -> float:
    size = 4.0 * parameters
    if gpus <= 1:
        return 0.0
    if gpus <= GPUS_PER_NODE:
        return 2 * (gpus - 1) / gpus * size / NODE_BANDWIDTH + 2 * (gpus - 1) * NODE_LATENCY
    levels = math.ceil(math.log2(gpus))
    return 2 * (gpus - 1) / gpus * size / NETWORK_BANDWIDTH + 2 * levels * NETWORK_LATENCY


def cluster_rows(parameters: int, step_s: float, batch: int, crops: int) -> list[list[str]]:
    """GPUs, nodes, per-GPU and global batch, steps, predicted efficiency and wall time of training on ``crops``
    crops: ``data.samples_per_epoch`` counts crops over all ranks, so more GPUs take fewer, larger steps. Across
    nodes the per-GPU batch doubles (the step doubles, the all-reduce does not), which keeps efficiency above 0.95."""
    rows = []
    for gpus in (1, 4, 8, 16, 64):
        per_gpu = batch if gpus <= GPUS_PER_NODE else 2 * batch
        step = step_s * per_gpu / batch
        efficiency = step / (step + allreduce_seconds(parameters, gpus))
        steps = math.ceil(crops / (gpus * per_gpu))
        wall = duration(steps * (step + allreduce_seconds(parameters, gpus)))
        nodes = math.ceil(gpus / GPUS_PER_NODE)
        rows.append([str(gpus), str(nodes), str(per_gpu), str(gpus * per_gpu), f"{steps:,}", f"{efficiency:.3f}", wall])
    return rows


def duration(seconds: float) -> str:
    """Seconds, minutes or hours, whichever reads best."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
