"""Batch norm over the global batch of a data-parallel run, on any backend (gloo included).

Under DistributedDataParallel every process sees only its shard of the batch, so a plain
batch-norm layer in training mode would normalise with the shard's statistics and a step
would no longer equal the single-process step. ``torch.nn.SyncBatchNorm`` fixes that on
CUDA only; :func:`sync_batch_norm` does it for every backend by giving each batch-norm layer
a forward that all-reduces its statistics (differentiably: :class:`AllReduceSum`) over the
processes of ``group``. With ``x`` of shape (N, C, ...) on each rank and ``n`` the number of
elements per channel over all ranks:

    mean = allreduce(sum_x) / n,   var = allreduce(sum (x - mean)^2) / n   (biased, as torch)
    y = (x - mean) / sqrt(var + eps) * weight + bias
    running_mean <- (1 - m) running_mean + m mean,   running_var <- (1 - m) running_var + m var n / (n - 1)

with ``m`` the momentum (``1 / num_batches_tracked`` when it is None), as ``nn.BatchNorm``.
In eval mode (with running statistics) the layer's own forward runs unchanged. Parameters,
buffers and state-dict keys are untouched; :func:`restore_batch_norm` removes the forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["AllReduceSum", "has_batch_norm", "restore_batch_norm", "sync_batch_norm"]

_MARK = "_abfp_global_bn_group"


class AllReduceSum(torch.autograd.Function):
    """``sum over ranks of x``, differentiable: every rank's output depends on every rank's
    input, so the gradient of ``x`` is the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def _global_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    if not self.training and self.track_running_stats:
        return type(self).forward(self, x)
    group: Any = getattr(self, _MARK)
    dims = [0, *range(2, x.ndim)]
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    local_n = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
    total = AllReduceSum.apply(torch.cat([x.sum(dims), local_n]), group)
    n = total[-1]
    mean = total[:-1] / n
    centered = x - mean.view(shape)
    var = AllReduceSum.apply(centered.square().sum(dims), group) / n
    y = centered * torch.rsqrt(var + self.eps).view(shape)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    if self.training and self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            assert self.num_batches_tracked is not None and self.running_var is not None
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var.detach() * (n.detach() / (n.detach() - 1).clamp(min=1))
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
    return y


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has a batch-norm layer (other than ``nn.SyncBatchNorm``)."""
    return any(isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def sync_batch_norm(model: nn.Module, group: Any = None) -> int:
    """Give every batch-norm layer of ``model`` the global-batch forward (see the module doc).

    ``group``: the process group (default: the whole world). Returns how many layers changed.
    """
    if not dist.is_available() or not dist.is_initialized():
        return 0
    changed = 0
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            object.__setattr__(m, _MARK, group)
            object.__setattr__(m, "forward", types.MethodType(_global_forward, m))
            changed += 1
    return changed


def restore_batch_norm(model: nn.Module) -> None:
    """Undo :func:`sync_batch_norm`: the layers get their own forward back."""
    for m in model.modules():
        if _MARK in m.__dict__:
            del m.__dict__[_MARK]
            m.__dict__.pop("forward", None)
