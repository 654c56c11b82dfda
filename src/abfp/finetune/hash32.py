"""The 32-bit counter hash of the DNF sampler (:mod:`.sampler`), in torch.

Element ``i`` of one draw gets two 32-bit words from the call's 63-bit ``key``, all
arithmetic modulo 2^32:

    z = splitmix64(key + (i // 2^32 + 1) * 0x9E3779B97F4A7C15)      (abfp.numerics.counter_noise)
    k1, k2 = z mod 2^32, z // 2^32                                   (the key of i's 2^32 segment)
    x = i mod 2^32
    u = h(x * MUL_U + k1),   r = h(x * MUL_R + k2)
    h(v): v ^= v >> 16; v *= H1; v ^= v >> 15; v *= H2; v ^= v >> 16

``h`` is an xor-shift-multiply integer hash (the constants of C. Wellons' "lowbias32"); it
and ``x -> x * MUL + k`` are bijections of 32-bit words, so no two elements of one call (below
2^32 elements) share ``u`` or ``r``. Every step is a 32-bit operation: eight lanes per AVX2
instruction in the compiled sampler (:mod:`.alias_kernel` has the numba version; the two
are tested equal), where a 64-bit multiply has no vector instruction before AVX-512.
"""

from __future__ import annotations

from torch import Tensor

from ..numerics.counter_noise import splitmix64

__all__ = ["H1", "H2", "MUL_R", "MUL_U", "hash32", "words"]

#: the counter multipliers of ``u`` and ``r`` (odd) and the two multipliers of ``h``
MUL_U, MUL_R, H1, H2 = 0x9E3779B9, 0x85EBCA77, 0x7FEB352D, 0x846CA68B

_M32 = 0xFFFFFFFF


def hash32(v: Tensor) -> Tensor:
    """``h(v)`` on an int64 tensor holding 32-bit words (results in 0 .. 2^32-1)."""
    v = v ^ (v >> 16)
    v = (v * H1) & _M32
    v = v ^ (v >> 15)
    v = (v * H2) & _M32  # the int64 product wraps above 2^63: its low 32 bits are still right
    return v ^ (v >> 16)


def words(key: int, i: Tensor) -> tuple[Tensor, Tensor]:
    """``(u, r)`` of the elements at flat indices ``i`` (int64 tensor, any shape and device)."""
    z = splitmix64(key, (i >> 32) + 1)
    x = i & _M32
    u = hash32((x * MUL_U + (z & _M32)) & _M32)
    r = hash32((x * MUL_R + ((z >> 32) & _M32)) & _M32)
    return u, r
