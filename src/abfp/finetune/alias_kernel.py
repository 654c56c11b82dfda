"""The compiled DNF sampler: ``y += xi`` in place, one pass, ``xi`` from Walker alias tables.

One numba kernel reads each element of the layer output once, draws its noise from a
counter-based hash of the element's flat index and adds it where it lies; no tensor of
random numbers, bins or noise is ever built. The draw of element ``i`` (row ``c`` of the
tables; formula of :mod:`.sampler`):

    z = splitmix64(key + (i + 1) * golden)        (:func:`abfp.numerics.fused.splitmix64`)
    v = (z >> 32) * B,   slot = v >> 32,   bin = slot if (v mod 2^32) < thr[c, slot] else alias[c, slot]
    y[i] += lo[c] + width[c] * (float32(bin) + float32((z mod 2^32) >> 8) * 2^-24)

with float32 arithmetic in exactly the order the eager torch version (:func:`.sampler.noisy_eager`)
uses, so both give the same bits (tested). The output is walked in chunks of
:data:`CHUNK` elements over ``torch.get_num_threads()`` threads; inside a chunk, every run of
elements of one channel uses that channel's table row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..numerics import fused

__all__ = ["AVAILABLE", "BLOCK", "CHUNK", "add_alias_noise_", "usable"]

#: elements per parallel work item (a few pages of float32: small next to a layer output)
CHUNK = 16384
#: elements per inner block (its scratch stays in L1)
BLOCK = 512

AVAILABLE = fused.AVAILABLE
_M32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_SCALE = np.float32(2.0**-24)


def usable() -> bool:
    """The compiled sampler can run in this process (see :func:`abfp.numerics.fused.usable`)."""
    return fused.usable()


if AVAILABLE:
    from numba import njit, prange

    from ..numerics.fused import splitmix64

    _jit: Any = dict(cache=True, nogil=True, error_model="numpy")

    @njit(inline="always", **_jit)
    def _hashes(i0, m, key, bins, slot, frac, pos):  # pragma: no cover - compiled
        """Slot, alias fraction and in-bin position of elements ``i0 .. i0 + m - 1`` (vectorises)."""
        for j in range(m):
            z = splitmix64(key, np.uint64(i0 + j) + np.uint64(1))
            v = (z >> _S32) * bins
            slot[j] = np.int64(v >> _S32)
            frac[j] = np.uint32(v & _M32)
            pos[j] = np.float32(np.uint32(z & _M32) >> np.uint32(8)) * _SCALE

    @njit(inline="always", **_jit)
    def _run(y, i0, m, key, thr, alias, l0, w0, slot, frac, pos, bins):  # pragma: no cover - compiled
        """``y[i0 + j] += xi`` for ``j < m`` (at most :data:`BLOCK`), one channel's tables.

        Three loops, so that the two without table look-ups vectorise: hashes, then the
        look-ups (scalar, branch-free), then the additions."""
        _hashes(i0, m, key, bins, slot, frac, pos)
        for j in range(m):
            s = slot[j]
            a = alias[s]
            # the bin as float32 (exact: bins < 2^24): s where frac < thr[s], else alias[s]
            pos[j] = (a + np.float32(frac[j] < thr[s]) * (np.float32(s) - a)) + pos[j]
        for j in range(m):
            y[i0 + j] = y[i0 + j] + (l0 + w0 * pos[j])

    @njit(inline="always", **_jit)
    def _run_mixed(y, i0, m, n, C, key, thr, alias, lo, width, slot, frac, pos, bins):  # pragma: no cover - compiled
        """As :func:`_run` where the channel changes every ``n`` elements (short runs: the
        channel of each element is looked up with its table entry)."""
        _hashes(i0, m, key, bins, slot, frac, pos)
        r = i0 // n
        c = r % C
        off = i0 - r * n
        for j in range(m):
            s = slot[j]
            a = alias[c, s]
            k = (a + np.float32(frac[j] < thr[c, s]) * (np.float32(s) - a)) + pos[j]
            pos[j] = lo[c] + width[c] * k
            off += 1
            if off == n:
                off = 0
                c = c + 1 if c + 1 < C else 0
        for j in range(m):
            y[i0 + j] = y[i0 + j] + pos[j]

    @njit(parallel=True, **_jit)
    def _alias_noise(y, n, C, key, thr, alias, lo, width):  # pragma: no cover - compiled
        """``y`` (flat float32, ``o * C * n`` elements laid out (o, C, n)): ``y[i] += xi_i``;
        ``thr`` (C, B) uint32, ``alias`` (C, B) float32 (the bins as numbers)."""
        total = y.shape[0]
        bins = np.uint64(thr.shape[1])
        chunks = (total + CHUNK - 1) // CHUNK
        for ch in prange(chunks):
            slot = np.empty(BLOCK, np.int64)
            frac = np.empty(BLOCK, np.uint32)
            pos = np.empty(BLOCK, np.float32)
            i = ch * CHUNK
            end = min(total, i + CHUNK)
            while i < end:
                if C > 1 and n < BLOCK:  # short runs of one channel: the channel per element
                    stop = min(end, i + BLOCK)
                    _run_mixed(y, i, stop - i, n, C, key, thr, alias, lo, width, slot, frac, pos, bins)
                else:  # runs of one channel, in blocks of at most BLOCK elements
                    run = i // n
                    c = run % C
                    stop = min(end, (run + 1) * n, i + BLOCK)
                    _run(y, i, stop - i, key, thr[c], alias[c], lo[c], width[c], slot, frac, pos, bins)
                i = stop


def add_alias_noise_(y: torch.Tensor, layout: tuple[int, int, int], key: int, thr: np.ndarray, alias: np.ndarray,
                     lo: torch.Tensor, width: torch.Tensor) -> None:
    """Add the noise to the contiguous float32 CPU tensor ``y`` in place (viewed as ``layout``
    = (outer, C, inner)); tables as :meth:`Histogram.kernel_tables` gives them."""
    if not (y.is_contiguous() and y.dtype == torch.float32 and y.device.type == "cpu"):
        raise ValueError("the compiled sampler needs a contiguous float32 CPU tensor")
    fused.set_threads()
    flat = y.detach().view(-1).numpy()
    _alias_noise(flat, max(1, layout[2]), layout[1], np.uint64(key), thr, alias, lo.numpy(), width.numpy())
