"""Data-parallel finetuning on ``torch.distributed`` (launched by ``torchrun``).

With ``W`` processes (ranks ``r = 0 .. W-1``) and a global batch of ``B`` samples (``B``
divisible by ``W``), rank ``r`` takes the contiguous shard ``[r B/W, (r+1) B/W)`` of each
step's batch. The model is wrapped in ``DistributedDataParallel``, which averages the
gradients over ranks; the default loss is a mean over the batch, so

    grad = (1/W) sum_r grad(mean over shard r) = grad(mean over the global batch),

the single-process gradient up to the order of the float additions (the all-reduce adds
per-rank partial sums). Batch-norm statistics are taken over the global batch too
(:mod:`.batchnorm`). Everything random inside step ``k`` on rank ``r`` (dropout, QAT's device
noise, DNF's sampler seeds) comes from torch's global generator reseeded with
:func:`step_seed` ``(seed, r, k)`` at the start of the step, so each rank is reproducible and
a resumed run needs no generator state. Objects every rank must share (a checkpoint, DNF
histograms) are computed on rank 0 and broadcast (:func:`from_main`).

The process group itself is joined by :func:`abfp.evaluate.distributed.init_from_env`.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..evaluate.distributed import shutdown, world
from .batchnorm import has_batch_norm, restore_batch_norm, sync_batch_norm

__all__ = ["check_divisible", "from_main", "leave", "mean_over_ranks", "shard", "step_seed", "sync_from_main",
           "unwrap", "wrap"]

T = TypeVar("T")
Batch = tuple[tuple[Tensor, ...], "Tensor | None"]


def step_seed(seed: int, rank: int, step: int) -> int:
    """The generator seed of step ``step`` on rank ``rank``:
    ``((seed * 1_000_003 + rank) * 1_000_000_007 + step) mod 2^63``, distinct for all
    ``seed < 9000``, ``rank < 1,000,003`` and ``step < 1,000,000,007`` (no wrap-around)."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (1 << 63)


def check_divisible(batch_size: int, world_size: int) -> None:
    """``ValueError`` unless each of the ``world_size`` processes gets an equal share of the batch."""
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not divisible by the number of processes ({world_size}); "
                         "each process takes an equal share of every batch")


def shard(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank ``rank``'s contiguous share ``[rank B/W, (rank+1) B/W)`` of a batch of ``B`` samples."""
    inputs, targets = batch
    if world_size == 1:
        return batch
    n = inputs[0].shape[0] // world_size
    part = slice(rank * n, (rank + 1) * n)
    return tuple(t[part] for t in inputs), None if targets is None else targets[part]


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` computed on rank 0 and sent to every rank (just ``fn()`` on one process).

    An exception raised by ``fn`` on rank 0 is raised on every rank, so all stop alike.
    """
    rank, w = world()
    if w == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


def sync_from_main(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place)."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def mean_over_ranks(value: float) -> float:
    """The mean of ``value`` over ranks (float64), identical on every rank."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world()[1]


def wrap(model: nn.Module) -> nn.Module:
    """``model`` itself on one process; else ``DistributedDataParallel(model)`` with its
    batch-norm layers normalising over the global batch (see :mod:`.batchnorm`)."""
    if world()[1] == 1:
        return model
    if has_batch_norm(model):
        # a group of its own, so that the statistics' all-reduces never interleave with DDP's buckets
        sync_batch_norm(model, dist.new_group())
    return nn.parallel.DistributedDataParallel(model)


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The model inside :func:`wrap`'s result, with its batch-norm layers restored."""
    model = wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped
    restore_batch_norm(model)
    return model


def leave(ok: bool) -> None:
    """Leave the process group: after a barrier when the run succeeded, at once after an error
    (another rank may never reach the barrier; the launcher stops the rest)."""
    if ok:
        shutdown()
    elif dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
