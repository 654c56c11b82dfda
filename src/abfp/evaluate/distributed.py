"""Data-parallel evaluation on ``torch.distributed`` (launched by ``torchrun``).

Each rank evaluates the batches ``i % world == rank``; outputs are gathered to every rank
in batch order and the metric is computed on the whole set, so the result equals the
single-process result exactly (noise streams restart per batch from ``(seed, batch
index)``, see :func:`abfp.evaluate.run_model`). Rank 0 alone prints and writes files, and
alone reads the result cache: :func:`broadcast_from_main` shares each lookup.

Backend: NCCL when the evaluation device is CUDA, gloo otherwise, chosen automatically.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1).

    Returns ``(rank, world size)``; a single process stays undistributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return world()
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return world()


def gather_outputs(pairs: list[tuple[int, Tensor]]) -> Tensor:
    """All-gather ``(batch index, outputs)`` pairs from every rank and concatenate in batch order."""
    _, w = world()
    if w == 1:
        return torch.cat([o for _, o in sorted(pairs, key=lambda p: p[0])]) if pairs else torch.zeros(0)
    everything: list[list[tuple[int, Tensor]] | None] = [None] * w
    dist.all_gather_object(everything, pairs)
    merged = sorted((p for part in everything if part for p in part), key=lambda p: p[0])
    return torch.cat([o for _, o in merged]) if merged else torch.zeros(0)


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself when not distributed).

    The evaluator reads the result cache on rank 0 only and shares what it found, so every
    rank skips or computes the same runs even while other processes write to the cache.
    """
    _, w = world()
    if w == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    """Leave the process group cleanly (all ranks wait for each other first)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
