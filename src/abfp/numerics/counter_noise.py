"""Counter-based device noise: the noise of one ADC sample is a pure function of a key and
the sample's index.

A product draws one 63-bit ``key`` from its ``torch.Generator`` (:func:`noise_key`); the
uniform noise of the ADC sample with flat index ``i`` in the product's logical
``(batch, tile, row, column)`` tensor is then

    z   = splitmix64(key + (i // 4 + 1) * 0x9E3779B97F4A7C15)
    k   = (16-bit lane i % 4 of z, as a signed integer) | 1       odd, in [-32767, 32767]
    e   = float32(k) * float32(w / 2**16)                          w = sqrt(12) * noise_std

(splitmix64: ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
z ^= z >> 31``, arithmetic modulo 2**64). ``e`` is uniform on ``(-w/2, w/2)`` over 32768 values
symmetric about 0 (a grid of ``w / 2**15``: 1/32768 LSB at the default width, far below
anything the ADC resolves; mean 0, variance ``w^2/12 (1 - 2^-30)``).

Because the noise is indexed, not streamed, it does not depend on how a product is split
into chunks, on the thread count or on which kernel evaluates it: the torch code here (any
device) and the compiled CPU kernels (:mod:`abfp.numerics.fused`) give the same values,
bit for bit (tested). A convolution's index is that of its im2col product, rows = output
positions, columns = output channels of one group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
_M64 = (1 << 64) - 1


def _signed(v: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return v - (1 << 64) if v >= 1 << 63 else v


def noise_key(generator: torch.Generator | None) -> int:
    """One key for one product, drawn from ``generator`` (torch's global one if ``None``)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator))


def noise_scale(noise_std: float) -> float:
    """``float32(w / 2**16)``, the value of one noise integer ``k`` in output LSBs."""
    return float(torch.tensor(math.sqrt(12.0) * noise_std / 65536.0, dtype=torch.float32))


def derived_key(base: int, c: int) -> int:
    """The ``c``-th output of SplitMix64 seeded with ``base`` (the scalar form of
    :func:`splitmix64` at counter ``c + 1``), 63 bits like a drawn key: one key derived from
    another and an index, without the overlap of ``base`` shifted."""
    z = (base + (c + 1) * GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * MIX1) & _M64
    z = ((z ^ (z >> 27)) * MIX2) & _M64
    return (z ^ (z >> 31)) >> 1


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(key: int, counter: Tensor) -> Tensor:
    """``mix(key + counter * golden)`` (int64 holding the unsigned 64-bit bits; wraps modulo
    2**64): splitmix64's output for each ``counter``."""
    z = counter * _signed(GOLDEN) + _signed(key & _M64)
    z = (z ^ _shr(z, 30)) * _signed(MIX1)
    z = (z ^ _shr(z, 27)) * _signed(MIX2)
    return z ^ _shr(z, 31)


def noise_ints(key: int, index: Tensor) -> Tensor:
    """The odd integers ``k`` (int64, in [-32767, 32767]) of the samples at ``index`` (int64,
    any shape and device). Integer arithmetic wraps modulo 2**64 as two's complement."""
    z = splitmix64(key, (index >> 2) + 1)
    # shifts of at most 48: the sign bits an arithmetic shift brings in are masked away
    v = (z >> ((index & 3) * 16)) & 0xFFFF
    return ((v ^ 0x8000) - 0x8000) | 1


def noise_values(key: int, index: Tensor, noise_std: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """The uniform noise ``e`` (output LSBs) of the samples at ``index``."""
    return noise_ints(key, index).to(dtype).mul_(noise_scale(noise_std))


def grid_index(offset: int, sizes: tuple[int, ...], strides: tuple[int, ...], device: torch.device) -> Tensor:
    """``offset + sum_d i_d * strides[d]`` over the grid ``sizes`` (int64): the flat logical
    indices of a strided block of a product's samples."""
    idx = torch.full((1,) * len(sizes), offset, dtype=torch.int64, device=device)
    for d, (n, s) in enumerate(zip(sizes, strides)):
        shape = [1] * len(sizes)
        shape[d] = n
        idx = idx + torch.arange(n, dtype=torch.int64, device=device).mul_(s).view(shape)
    return idx
