"""``y + xi`` with ``xi`` drawn i.i.d. element-wise from a :class:`Histogram`, in one pass.

A DNF training step adds one noise sample to every output element of every analog layer,
so drawing the noise must cost little next to the layer itself. The sampler is one fused
element-wise kernel (``torch.compile``; plain eager torch when compiling is unavailable)
with a counter-based random number generator, so it needs no random-number state:

    h1 = mix(mix((i + s0) mod 2^32) xor s1),   h2 = mix(h1 xor s2)
    mix(x): x = ((x >> 16) xor x) * 0x45d9f3b mod 2^32  (twice), then (x >> 16) xor x

with ``i`` the element's flat index and ``(s0, s1, s2)`` three fresh 32-bit seeds drawn from
torch's global generator per call (so ``torch.manual_seed`` and ``torch.get_rng_state`` make
runs repeatable). The bin comes from Walker's alias method (see :mod:`.histogram`):

    v = h1 * B,   slot s = v >> 32  (uniform on 0..B-1),   f = v mod 2^32  (uniform 32 bits)
    bin k = s if f < threshold[s] else alias[s]
    xi = lo + width * (k + (h2 >> 8) / 2^24)                (uniform inside bin k)

Bin probabilities are exact to 2^-32 and the position inside a bin has 24 bits.
Gradients pass through unchanged: ``d(y + xi)/dy = 1``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Literal

import torch
from torch import Tensor

from .histogram import Histogram

__all__ = ["add_noise", "backend_in_use", "noisy_layout", "warm_up", "Backend"]

Backend = Literal["auto", "compiled", "eager"]

_M32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**27: products of 32-bit values stay inside int64


def _mix(x: Tensor) -> Tensor:
    x = ((x >> 16) ^ x) * _MULT & _M32
    x = ((x >> 16) ^ x) * _MULT & _M32
    return (x >> 16) ^ x


def _noisy(y3: Tensor, seeds: Tensor, packed: Tensor, lo: Tensor, width: Tensor) -> Tensor:
    """``y3 + xi`` for ``y3`` laid out as (outer, C, inner); row ``c`` of the tables for channel ``c``."""
    o, c, n = y3.shape
    b = packed.shape[1]
    ch = torch.arange(c, device=y3.device, dtype=torch.int64).view(1, c, 1)
    i = (torch.arange(o, device=y3.device, dtype=torch.int64).view(o, 1, 1) * c + ch) * n \
        + torch.arange(n, device=y3.device, dtype=torch.int64).view(1, 1, n)
    h1 = _mix(_mix((i + seeds[0]) & _M32) ^ seeds[1])
    h2 = _mix(h1 ^ seeds[2])
    v = h1 * b
    slot = v >> 32
    t = packed.reshape(-1)[ch * b + slot]
    k = torch.where((v & _M32) < (t & _M32), slot, t >> 32)
    pos = k.to(torch.float32) + (h2 >> 8).to(torch.float32) * (2.0**-24)
    return y3 + (lo.view(1, c, 1) + width.view(1, c, 1) * pos)


_compiled: Callable | None = None
_compile_failed = False


def _kernel(backend: Backend) -> Callable:
    global _compiled
    if backend == "eager" or (backend == "auto" and _compile_failed):
        return _noisy
    if _compiled is None:
        _compiled = torch.compile(_noisy, dynamic=True)
    return _compiled


def _run(backend: Backend, *args: Tensor) -> Tensor:
    global _compile_failed
    if backend == "auto" and not _compile_failed:
        try:
            return _kernel("compiled")(*args)
        except Exception as e:  # no C++ compiler, unsupported platform, ...: fall back once, loudly
            _compile_failed = True
            warnings.warn(f"abfp.finetune: torch.compile of the DNF noise sampler failed ({type(e).__name__}: {e}); "
                          "using the slower eager sampler", RuntimeWarning, stacklevel=3)
    return _kernel(backend)(*args)


def backend_in_use(backend: Backend) -> str:
    """``"compiled"`` or ``"eager"``: what ``backend`` runs as in this process."""
    return "eager" if backend == "eager" or (backend == "auto" and _compile_failed) else "compiled"


def noisy_layout(shape: tuple[int, ...] | torch.Size, channel_dim: int | None) -> tuple[int, int, int]:
    """(outer, C, inner) view of a contiguous tensor of ``shape`` with ``channel_dim`` in the middle."""
    shape = tuple(shape)
    if channel_dim is None:
        return (1, 1, math.prod(shape))
    d = channel_dim % len(shape)
    return (math.prod(shape[:d]), shape[d], math.prod(shape[d + 1 :]))


class _AddNoise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, backend: Backend, seeds: Tensor, packed: Tensor, lo: Tensor, width: Tensor,  # type: ignore[override]
                layout: tuple[int, int, int]) -> Tensor:
        # detach() of the view drops its ``_base``: torch.compile would otherwise guard on (and
        # recompile for) every distinct shape of the layer output the view was taken from
        y3 = y.detach().contiguous().view(layout).detach()
        return _run(backend, y3, seeds, packed, lo, width).view(y.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None, None, None, None, None, None


def add_noise(y: Tensor, hist: Histogram, *, backend: Backend = "auto") -> Tensor:
    """``y + xi``, ``xi`` i.i.d. from ``hist`` (row ``c`` for index ``c`` of ``hist.channel_dim``).

    Draws three seeds from torch's global generator; the gradient with respect to ``y`` is
    the identity.
    """
    if backend not in ("auto", "compiled", "eager"):
        raise ValueError(f"backend must be 'auto', 'compiled' or 'eager', got {backend!r}")
    layout = noisy_layout(y.shape, hist.channel_dim)
    if layout[1] != hist.channels:
        raise ValueError(f"output of shape {tuple(y.shape)} has {layout[1]} channels along dim {hist.channel_dim}, "
                         f"the histogram {hist.channels}")
    packed, lo, width = hist.alias_table(y.device)
    seeds = torch.randint(0, 1 << 32, (3,), dtype=torch.int64).to(y.device)
    return _AddNoise.apply(y, backend, seeds, packed, lo, width, layout)


def warm_up(hist: Histogram, shape: tuple[int, ...], *, backend: Backend = "auto") -> None:
    """Compile the sampler for outputs like ``shape`` now (outside any timed step); draws no
    random numbers from the global generator."""
    if backend == "eager":
        return
    packed, lo, width = hist.alias_table("cpu")
    y3 = torch.zeros(noisy_layout(shape, hist.channel_dim))
    _run(backend, y3, torch.zeros(3, dtype=torch.int64), packed, lo, width)
