"""Data-parallel meta-training on torch.distributed (launched by ``torchrun``).

Each rank draws its own share of every meta-batch (the sampler's ``rank``/``world_size``),
computes the meta-gradient of its tasks, and the shares are summed weighted by their task
counts, so the update equals one process running the whole meta-batch. Only rank 0 writes
logs, checkpoints and reports. Backends: gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int]:
    """``(rank, world_size)`` from the variables torchrun sets, ``(0, 1)`` without them."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Join the process group that torchrun describes (no-op for a single process)."""
    rank, world = env_world()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return rank, world


def all_reduce_weighted_gradients(module: torch.nn.Module, weight: float) -> None:
    """``grad <- sum over ranks of weight_r * grad_r`` (weights: each rank's share of the tasks)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) * weight     # one collective instead of one per tensor
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(module: torch.nn.Module) -> None:
    """Keep running statistics (BatchNorm) identical on every rank."""
    world = dist.get_world_size()
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b /= world
