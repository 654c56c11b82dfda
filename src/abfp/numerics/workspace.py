"""Scratch buffers reused across calls, so the hot loops never touch fresh memory.

A freshly allocated block of a few MiB costs a page fault per 4 KiB page the first time it
is written; the allocator returns such blocks to the kernel when they are freed, so a loop
that allocates its temporaries anew pays those faults on every call (measured: up to 35 % of
a noisy simulated linear layer on CPU). :func:`scratch` hands out views of per-thread
buffers that persist and only grow, one per name, dtype and device. Their sizes are bounded
by the kernels' chunk sizes (a few MiB each); :func:`release` frees them.

A view is valid until the next :func:`scratch` call with the same name on the same thread;
no result returned to a caller is ever a scratch view.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

_local = threading.local()


def _buffers() -> dict[tuple[str, torch.dtype, torch.device], Tensor]:
    bufs = getattr(_local, "buffers", None)
    if bufs is None:
        bufs = _local.buffers = {}
    return bufs


def scratch(name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A contiguous tensor of ``shape`` (uninitialised) backed by the buffer ``name``."""
    dev = torch.device(device)
    n = math.prod(shape)
    key = (name, dtype, dev)
    bufs = _buffers()
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: written in place inside inference mode and out of it
            buf = torch.empty(max(n, 1), dtype=dtype, device=dev)
        bufs[key] = buf
    return buf[:n].view(shape)


def held_bytes() -> int:
    """Bytes held by this thread's scratch buffers."""
    return sum(b.numel() * b.element_size() for b in _buffers().values())


def release() -> None:
    """Free this thread's scratch buffers."""
    _buffers().clear()
