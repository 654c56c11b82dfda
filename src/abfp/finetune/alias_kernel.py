"""The compiled DNF sampler: ``y += xi`` in place, one pass, ``xi`` from Walker alias tables.

One numba kernel reads each element of the layer output once, draws its noise from two
counter-based 32-bit hashes of the element's flat index and adds it where it lies; no
tensor of random numbers, bins or noise is ever built. The draw of element ``i`` (row ``c``
of the tables; formulas of :mod:`.hash32` and :mod:`.sampler`, arithmetic modulo 2^32):

    x = i mod 2^32,   (k1, k2) = the key words of segment i // 2^32
    u = h(x * MUL_U + k1),   r = h(x * MUL_R + k2)
    s = u >> (32 - b),   e = packed[c, s],   bin = s if (u mod 2^(32-b)) < (e >> b) else e mod 2^b
    y[i] += lo[c] + width[c] * (float32(bin) + float32(r >> 8) * 2^-24)

with float32 arithmetic in exactly the order the eager torch version (:func:`.sampler.noisy_eager`)
uses, so both give the same bits (tested). The output is walked in chunks of :data:`CHUNK`
elements (aligned, so a chunk never straddles two 2^32 segments) over
``torch.get_num_threads()`` threads, and inside a chunk in blocks of :data:`BLOCK`. Where the
CPU has AVX-512 and the table at most 128 slots (the default 100 bins), a block is one pass of
sixteen lanes with the table held in registers (:mod:`.avx512_block`), its last ``m mod 16``
elements scalar. Otherwise a block runs in three loops: the hashes ``u`` (vectorised, 8 per
AVX2 instruction), the table look-ups (eight per AVX2 gather where the CPU has it,
:mod:`.avx2_lookup`; else scalar, branch-free), then ``r`` and the additions (vectorised).
The tables reach the kernel padded with zero entries to at least 128 slots (never looked
up); ``b`` is passed with them. Where the channel changes within
a block (short runs: per-channel tables of a linear layer) the look-up loop also applies
each element's ``lo`` and ``width``.

numba caches these kernels on disk keyed by *this* file's time stamp and size: it does not see
a change to :mod:`.avx512_block`, :mod:`.avx2_lookup` or :mod:`.hash32`, whose code the kernels
inline. A change there must also change this file (or delete ``__pycache__/alias_kernel.*.nb*``),
or the old code keeps running from the cache. (Last change of the 16-lane pass: 2026-12-02,
strength-reduced counters and one integer-to-float conversion per element.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..numerics import fused

__all__ = ["AVAILABLE", "BLOCK", "CHUNK", "add_alias_noise_", "kernel_args", "launch", "padded", "stream_noise_at", "usable"]

#: elements per parallel work item (a few pages of float32: small next to a layer output; divides 2^32)
CHUNK = 16384
#: elements per inner block (its scratch stays in L1)
BLOCK = 512

AVAILABLE = fused.AVAILABLE
_SCALE = np.float32(2.0**-24)
stream_noise_at: Any = None  # the compiled kernel below, where numba is present


def usable() -> bool:
    """The compiled sampler can run in this process (see :func:`abfp.numerics.fused.usable`)."""
    return fused.usable()


if AVAILABLE:
    from numba import carray, njit, prange, types
    from numba.extending import intrinsic

    from ..numerics.fused import splitmix64
    from . import avx2_lookup, avx512_block
    from .avx2_lookup import lookup8
    from .avx512_block import noise16
    from .hash32 import H1, H2, MUL_R, MUL_U

    _jit: Any = dict(cache=True, nogil=True, error_model="numpy")
    _U = np.uint32
    _M32 = np.uint64(0xFFFFFFFF)

    def _op32(name: str):
        """A numba intrinsic: the LLVM ``name`` instruction on two uint32 values, giving uint32.
        (numba types uint32 arithmetic as 64-bit; LLVM then narrows it back to 32-bit lanes
        in some loops and not in others. These keep the hash's IR 32-bit, so it vectorises
        8 wide on AVX2 wherever it is inlined.)"""

        @intrinsic
        def op(typingctx, a, b):
            if a != types.uint32 or b != types.uint32:
                return None

            def codegen(context, builder, signature, args):
                return getattr(builder, name)(args[0], args[1])

            return types.uint32(types.uint32, types.uint32), codegen

        return op

    _mul32, _add32, _xor32, _shr32 = (_op32(n) for n in ("mul", "add", "xor", "lshr"))

    @njit(inline="always", **_jit)
    def _h(v):  # pragma: no cover - compiled
        """The 32-bit hash ``h`` of :mod:`.hash32` (uint32 in, uint32 out)."""
        v = _xor32(v, _shr32(v, _U(16)))
        v = _mul32(v, _U(H1))
        v = _xor32(v, _shr32(v, _U(15)))
        v = _mul32(v, _U(H2))
        return _xor32(v, _shr32(v, _U(16)))

    @njit(inline="always", **_jit)
    def _word(x0, j, mul, k):  # pragma: no cover - compiled
        """``h((x0 + j) * mul + k)`` modulo 2^32."""
        return _h(_add32(_mul32(_add32(x0, _U(j)), mul), k))

    @njit(inline="always", **_jit)
    def _u_words(x0, m, k1, u):  # pragma: no cover - compiled
        """``u[j] = h(x * MUL_U + k1)`` for ``x = x0 + j``, ``j < m``."""
        for j in range(m):
            u[j] = _word(x0, j, _U(MUL_U), k1)

    @njit(inline="always", **_jit)
    def _pick(v, e, b, fmask, smask):  # pragma: no cover - compiled
        """The bin (int32) of the word ``v`` given its slot's table entry ``e`` (branch-free)."""
        a = np.int32(e & smask)
        return a + np.int32((v & fmask) < (e >> b)) * (np.int32(v >> _U(32 - b)) - a)

    @njit(inline="always", **_jit)
    def _lookup_scalar(tab, u, kb, j0, m, b):  # pragma: no cover - compiled
        """``kb[j] = float32(bin)`` for ``j0 <= j < m``, one table row ``tab`` (scalar, branch-free)."""
        fmask = _U((1 << (32 - b)) - 1)
        smask = _U((1 << b) - 1)
        for j in range(j0, m):
            v = u[j]
            kb[j] = np.float32(_pick(v, tab[v >> _U(32 - b)], b, fmask, smask))

    @njit(inline="always", **_jit)
    def _lookup_gather(tab, u, kb, j0, m, b):  # pragma: no cover - compiled
        """:func:`_lookup_scalar` eight elements per AVX2 gather (:mod:`.avx2_lookup`), the rest scalar."""
        j = j0
        while j + 8 <= m:
            lookup8(tab, u, kb, j, b)
            j += 8
        _lookup_scalar(tab, u, kb, j, m, b)

    #: the look-up loop this process compiles (the gather only where the CPU has AVX2)
    _lookup = _lookup_gather if avx2_lookup.USABLE else _lookup_scalar

    @njit(inline="always", **_jit)
    def _run(yb, x0, k1, k2, tab, b, l0, w0, u, kb):  # pragma: no cover - compiled
        """``yb[j] += xi`` for the block ``yb`` (at most :data:`BLOCK` elements) of one channel."""
        m = yb.shape[0]
        _u_words(x0, m, k1, u)
        _lookup(tab, u, kb, 0, m, b)
        for j in range(m):
            p = np.float32(np.int32(_shr32(_word(x0, j, _U(MUL_R), k2), _U(8)))) * _SCALE
            yb[j] = yb[j] + (l0 + w0 * (kb[j] + p))

    @njit(inline="always", **_jit)
    def _run_scalar(yb, j0, x0, k1, k2, tab, b, l0, w0):  # pragma: no cover - compiled
        """:func:`_run` for the elements ``j0 <= j < len(yb)`` one at a time."""
        fmask = _U((1 << (32 - b)) - 1)
        smask = _U((1 << b) - 1)
        for j in range(j0, yb.shape[0]):
            v = _word(x0, j, _U(MUL_U), k1)
            k = np.float32(_pick(v, tab[v >> _U(32 - b)], b, fmask, smask))
            p = np.float32(np.int32(_shr32(_word(x0, j, _U(MUL_R), k2), _U(8)))) * _SCALE
            yb[j] = yb[j] + (l0 + w0 * (k + p))

    @njit(inline="always", **_jit)
    def _run16(yb, x0, k1, k2, tab, b, l0, w0):  # pragma: no cover - compiled
        """:func:`_run` with sixteen lanes and the table (padded to 128 entries) in AVX-512 registers
        (:mod:`.avx512_block`), the last ``len(yb) mod 16`` elements scalar."""
        n16 = yb.shape[0] // 16
        noise16(yb, n16, x0, k1, k2, tab, b, l0, w0)
        _run_scalar(yb, n16 * 16, x0, k1, k2, tab, b, l0, w0)

    #: whether a one-channel block runs :func:`_run16` (``b`` at most this) or :func:`_run`
    _BITS16 = avx512_block.MAX_BITS if avx512_block.USABLE else -1

    @njit(inline="always", **_jit)
    def _run_mixed(yb, x0, k1, k2, c, off, n, tab, b, lo, width, u, kb):  # pragma: no cover - compiled
        """As :func:`_run` where the channel changes every ``n`` elements (``c``, ``off``: the
        channel of ``yb[0]`` and its place in its run): the look-up loop applies each
        element's ``lo`` and ``width``."""
        m = yb.shape[0]
        C = tab.shape[0]
        fmask = _U((1 << (32 - b)) - 1)
        smask = _U((1 << b) - 1)
        _u_words(x0, m, k1, u)
        for j in range(m):  # u's in-bin positions, in kb
            kb[j] = np.float32(np.int32(_shr32(_word(x0, j, _U(MUL_R), k2), _U(8)))) * _SCALE
        for j in range(m):
            v = u[j]
            k = np.float32(_pick(v, tab[c, v >> _U(32 - b)], b, fmask, smask))
            kb[j] = lo[c] + width[c] * (k + kb[j])
            off += 1
            if off == n:
                off = 0
                c = c + 1 if c + 1 < C else 0
        for j in range(m):
            yb[j] = yb[j] + kb[j]

    @njit(inline="always", **_jit)
    def _chunk(y, ch, n, key, tab, b, lo, width, u, kb):  # pragma: no cover - compiled
        """Chunk ``ch`` of the flat output ``y`` (laid out (o, C, n))."""
        C = tab.shape[0]
        i = ch * CHUNK
        end = min(y.shape[0], i + CHUNK)
        z = splitmix64(np.uint64(key), np.uint64(i >> 32) + np.uint64(1))
        k1 = _U(z & _M32)
        k2 = _U(z >> np.uint64(32))
        while i < end:
            x0 = _U(i & 0xFFFFFFFF)
            if C > 1 and n < BLOCK:  # short runs of one channel: the channel per element
                stop = min(end, i + BLOCK)
                run = i // n
                _run_mixed(y[i:stop], x0, k1, k2, run % C, i - run * n, n, tab, b, lo, width, u, kb)
            else:  # runs of one channel, in blocks of at most BLOCK elements (no scratch: the rest of the run)
                run = i // n
                c = run % C
                if b <= _BITS16:
                    stop = min(end, (run + 1) * n)
                    _run16(y[i:stop], x0, k1, k2, tab[c], b, lo[c], width[c])
                else:
                    stop = min(end, (run + 1) * n, i + BLOCK)
                    _run(y[i:stop], x0, k1, k2, tab[c], b, lo[c], width[c], u, kb)
            i = stop

    @njit(parallel=True, **_jit)
    def _alias_noise(y, n, key, tab, b, lo, width):  # pragma: no cover - compiled
        """``y`` (flat float32, ``o * C * n`` elements laid out (o, C, n)): ``y[i] += xi_i``;
        ``tab`` (C, >= 2^b) uint32 packed alias words (zeros past slot 2^b), ``lo``, ``width`` (C,) float32."""
        chunks = (y.shape[0] + CHUNK - 1) // CHUNK
        for ch in prange(chunks):
            u = np.empty(BLOCK, np.uint32)
            kb = np.empty(BLOCK, np.float32)
            _chunk(y, ch, n, key, tab, b, lo, width, u, kb)

    @njit(inline="always", **_jit)
    def _serial(y, n, key, tab, b, lo, width):  # pragma: no cover - compiled
        u = np.empty(BLOCK, np.uint32)
        kb = np.empty(BLOCK, np.float32)
        for ch in range((y.shape[0] + CHUNK - 1) // CHUNK):
            _chunk(y, ch, n, key, tab, b, lo, width, u, kb)

    @njit(**_jit)
    def _alias_noise_serial(y, n, key, tab, b, lo, width):  # pragma: no cover - compiled
        """:func:`_alias_noise` on the calling thread (no parallel launch: one chunk, or one thread)."""
        _serial(y, n, key, tab, b, lo, width)

    @intrinsic
    def _float32_at(typingctx, addr):
        """The int64 address ``addr`` as a float32 pointer."""
        if addr != types.int64:
            return None
        ptr = types.CPointer(types.float32)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr))

        return ptr(types.int64), codegen

    @njit(**_jit)
    def stream_noise_at(addr, size, n, base, c, tab, b, lo, width):  # pragma: no cover - compiled
        """:func:`launch` on the calling thread on the ``size`` float32 values at address ``addr``
        (a contiguous tensor's ``data_ptr()``, kept alive by the caller), with the key of the
        ``c``-th product of the stream ``base`` (:func:`abfp.finetune.sampler.stream_key`, here
        in compiled code); no checks (:class:`abfp.finetune.sampler.SiteSampler` makes them)."""
        key = splitmix64(np.uint64(base), np.uint64(c) + np.uint64(1)) >> np.uint64(1)
        _serial(carray(_float32_at(addr), (size,)), n, key, tab, b, lo, width)


def kernel_args(tab: np.ndarray, lo: np.ndarray, width: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """``(table, b, lo, width)`` as the kernel reads them, from the tables of
    :meth:`Histogram.kernel_tables` (``tab`` (C, 2^b)): the table with zero columns appended up
    to 128 slots (:mod:`.avx512_block` loads 128 entries; slots ``>= 2^b`` are never looked up)
    and ``b`` (a sampler keeps these per histogram: :func:`launch` takes them)."""
    b = tab.shape[1].bit_length() - 1
    if tab.shape[1] < 128:
        out = np.zeros((tab.shape[0], 128), np.uint32)
        out[:, : tab.shape[1]] = tab
        tab = out
    return tab, b, lo, width


def padded(tab: np.ndarray) -> np.ndarray:
    """The packed table ``tab`` (C, 2^b) padded to at least 128 slots (:func:`kernel_args`)."""
    return kernel_args(tab, tab[:0, 0], tab[:0, 0])[0]


def launch(flat: np.ndarray, n: int, key: int, tab: np.ndarray, b: int, lo: np.ndarray, width: np.ndarray) -> None:
    """``flat[i] += xi_i`` for the flat float32 array ``flat`` laid out (outer, C, ``n``), with the
    tables of :func:`kernel_args`; no checks (:func:`add_alias_noise_` is the checked entry)."""
    if flat.shape[0] <= CHUNK or torch.get_num_threads() == 1:  # no thread pool to launch
        _alias_noise_serial(flat, n, key, tab, b, lo, width)  # key: a Python int (numba passes it as int64 faster)
    else:
        fused.set_threads()
        _alias_noise(flat, n, key, tab, b, lo, width)


def add_alias_noise_(y: torch.Tensor, layout: tuple[int, int, int], key: int, tab: np.ndarray, lo: np.ndarray,
                     width: np.ndarray) -> None:
    """Add the noise to the contiguous float32 CPU tensor ``y`` in place (viewed as ``layout``
    = (outer, C, inner)); tables as :meth:`Histogram.kernel_tables` gives them."""
    if not (y.is_contiguous() and y.dtype == torch.float32 and y.device.type == "cpu"):
        raise ValueError("the compiled sampler needs a contiguous float32 CPU tensor")
    launch(y.detach().numpy().reshape(-1), max(1, layout[2]), key, *kernel_args(tab, lo, width))
