"""Compiled CPU kernels (numba) for the two memory-bound halves of the fast path.

The torch path in :mod:`.kernels` makes one pass over memory per element-wise operation:
about seven over a convolution's patches (gather, two block-max reductions, divide,
multiply, round, convert) and a dozen over the partial sums (divide, noise, clamp, round,
two scale multiplies, the tile sum). These kernels do each half in one pass, with the same
float32 operations in the same order, so their results are identical bit for bit (tested
in ``tests/numerics/test_fused.py``):

- :func:`patch_encode` / :func:`patch_codes`: a convolution's DAC straight from the
  padded input, never building the float32 patch matrix (codes written as int8);
- :func:`rows_block_max` / :func:`rows_codes`: the same for the rows of a product (linear
  layers, attention);
- :func:`epilogue_rows` / :func:`epilogue_cols`: ADC on integer tile products
  ``r = D * lsb_num / lsb_den``, noise (:mod:`.counter_noise`), clamp, round, ``* sx * sw``, and the
  float32 sum over tiles in order ``t = 0, 1, ...``;
- :func:`narrow_rows` / :func:`narrow_cols8`: for narrow tiles (rows: n < 32; convolutions:
  n = 8) the tile products too, in the same pass, so the partial sums never go to memory.
  (On a CPU with AVX-512 VNNI, :mod:`.vnni8` does n = 8 with int8 dot products: same numbers.)

numba compiles them on first use (a few seconds, cached on disk afterwards) and runs them
on ``torch.get_num_threads()`` threads (its OpenMP layer); a process forked from one that
ran them takes the torch path (:func:`usable`). Without numba (or with ``ABFP_NO_NUMBA=1``) the
torch path runs instead: same numbers, slower. ``error_model="numpy"`` lets the divisions
vectorise (a zero divisor cannot occur: zero scales are tested for explicitly); only the
rows' block max runs with fast-math flags (``max``/``abs`` of finite values, exact either way).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

# numba's OpenMP layer first (the fastest next to torch's own OpenMP here; numba would
# otherwise prefer TBB wherever the tbb package happens to be installed: 1.4x slower)
os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp tbb workqueue")

try:  # an optional accelerator: everything works without it
    if os.environ.get("ABFP_NO_NUMBA"):
        raise ImportError("disabled by ABFP_NO_NUMBA")
    import numba
    from numba import njit, prange, types
    from numba.extending import overload
except ImportError:  # pragma: no cover - exercised when numba is absent
    numba = None

AVAILABLE = numba is not None


def host_cpu_has(feature: str) -> bool:
    """numba is present, compiles for this machine's CPU (``NUMBA_CPU_NAME`` unset: no portable
    caches, so CPU-specific code may be emitted), and that CPU has ``feature`` (an LLVM feature
    name: ``"avx2"``, ``"avx512f"``, ...)."""
    if numba is None or numba.config.CPU_NAME is not None:
        return False
    from llvmlite import binding

    try:
        return bool(binding.get_host_cpu_features().get(feature, False))
    except RuntimeError:  # pragma: no cover - llvmlite cannot read the features
        return False

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MIN_NORMAL = np.float32(2.0**-126)
#: Scales at or above 2^127 (saturated, see :data:`abfp.numerics.blocks.POW2_MAX`) need the clamp.
_SCALE_CLAMP_FROM = np.float32(2.0**127)
#: The largest finite bfloat16 as float32 bits: bfloat16 scales saturate there.
_BF16_MAX_BITS = np.uint32(0x7F7F0000)


#: Rows and columns of one work item of :func:`narrow_rows` (its sums: 16 KiB, in L1).
NARROW_ROWS = 16
NARROW_COLS = 256
#: Values (codes or partial sums of one output channel) per block of :func:`grouped_direct`:
#: a few output rows at a time stay in L1/L2.
DIRECT_ELEMENTS = 4096
#: :func:`grouped_direct` computes whole vectors of this many positions (AVX-512: 16 float32),
#: and its callers leave this much slack after the phase images and the position map.
DIRECT_LANES = 16
#: Tasks per :func:`grouped_direct` call at most (each takes a run of groups and images and
#: allocates its scratch once).
DIRECT_ITEMS = 256
#: Positions of one work item of :func:`narrow_cols8` (measured on fashion-cnn's layers:
#: 1024 ran 1.1-1.6x faster than 128, where each short vector loop pays its set-up).
NARROW_STRIPE = 1024

_launched_in: int | None = None  # the process whose threads ran the kernels


def usable() -> bool:
    """numba is present and this process may launch its threads: not a child forked from a
    process that already did (GNU OpenMP cannot run in such a child: numba would terminate
    it), where the torch path runs instead, with the same numbers."""
    return AVAILABLE and (_launched_in is None or _launched_in == os.getpid())


def set_threads() -> None:
    """Run the kernels on as many threads as torch uses (call before launching one)."""
    global _launched_in
    assert numba is not None
    _launched_in = os.getpid()
    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != n:  # launching numba's OpenMP pool resets the OpenMP thread count torch shares
        torch.set_num_threads(n)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array (no copy; bfloat16 is not supported)."""
    return t.detach().numpy()


if AVAILABLE:
    _jit: Any = dict(cache=True, nogil=True, error_model="numpy")

    @njit(inline="always", **_jit)
    def splitmix64(key: np.uint64, counter: np.uint64) -> np.uint64:
        """``mix(key + counter * golden)``: splitmix64's output for ``counter`` (modulo 2**64)."""
        z = key + counter * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))

    @njit(inline="always", **_jit)
    def _noise_int(key: np.uint64, idx: np.int64) -> np.float32:
        """The odd noise integer ``k`` of sample ``idx`` (:mod:`.counter_noise`), as float32."""
        u = np.uint64(idx)
        z = splitmix64(key, (u >> np.uint64(2)) + np.uint64(1))
        v = np.int64((z >> ((u & np.uint64(3)) * np.uint64(16))) & np.uint64(0xFFFF))
        return np.float32(((v ^ 0x8000) - 0x8000) | 1)

    @njit(inline="always", **_jit)
    def _noise_run(key, base, nj, buf):
        """``buf[off + j] = _noise_int(key, base + j)`` for ``j < nj``, ``off = base mod 4``
        (returned): one hash per four samples (the four 16-bit lanes of one splitmix64
        output) instead of one per sample; ``buf`` holds at least ``nj + 6`` values."""
        g0 = base >> 2
        for g in range(((base + nj + 3) >> 2) - g0):
            z = splitmix64(key, np.uint64(g0 + g) + np.uint64(1))
            for lane in range(4):  # unrolled: four adjacent stores
                v = np.int64((z >> np.uint64(16 * lane)) & np.uint64(0xFFFF))
                buf[4 * g + lane] = np.float32(((v ^ 0x8000) - 0x8000) | 1)
        return base - 4 * g0

    def _in(v, like):  # pragma: no cover - numba compiles its overload below
        """``v`` as a number of ``like``'s float type (float32 or float64)."""
        raise NotImplementedError

    @overload(_in, inline="always")
    def _in_overload(v, like):
        if like == types.float64:
            return lambda v, like: np.float64(v)
        return lambda v, like: np.float32(v)

    @njit(inline="always", **_jit)
    def _lsb(dv, lsb_num, lsb_den, noise_step, key, noisy, idx):
        """A tile product in output LSBs, with its noise: ``D * lsb_num / lsb_den + e``, in
        ``lsb_num``'s float type: float32 (the narrow plans' one exact division), or float64 for
        a wide plan (:class:`~abfp.numerics.adc.AdcPlan` form C: ``lsb_num = G L(b_y)``,
        ``lsb_den = n L(b_x) L(b_w)``, plus the float32 noise value ``e``, as
        :func:`abfp.numerics.kernels.adc_` computes it)."""
        r = (_in(dv, lsb_num) * lsb_num) / lsb_den
        if noisy:
            r = r + _in(_noise_int(key, idx) * noise_step, lsb_num)
        return r

    @njit(inline="always", **_jit)
    def _code(x, s, lx, clamp):
        """One DAC code: ``round(clamp(x / s, -1, 1) * lx)``, 0 where the scale ``s`` is 0."""
        r = x / s if s > 0 else np.float32(0.0)
        if clamp:
            r = min(max(r, np.float32(-1.0)), np.float32(1.0))
        return np.rint(r * lx)

    @njit(inline="always", **_jit)
    def _dac(src, scales, lx, clamp, dst):
        """``dst[v] = _code(src[v], scales[v])`` along one run of positions."""
        for v in range(src.shape[0]):
            dst[v] = _code(src[v], scales[v], lx, clamp)

    @njit(inline="always", **_jit)
    def _block_scales(xf, k_src, k_off, k0, k1, src_stride, start, nv, bf16, o):
        """``o[v] = max |xf[k_src[k] src_stride + start + k_off[k] + v]|`` over reduction indices
        ``k0 .. k1 - 1`` (a block of patch values; ``xf`` the phase images, flat) for ``v < nv``,
        rounded to nearest even bfloat16 as torch converts where ``bf16``, saturating at the largest
        finite bfloat16 (else float32 as it is)."""
        for v in range(nv):
            o[v] = np.float32(0.0)
        for k in range(k0, k1):
            i0 = k_src[k] * src_stride + start + k_off[k]
            src = xf[i0 : i0 + nv]
            for v in range(nv):
                a = abs(src[v])
                o[v] = a if a > o[v] else o[v]
        if bf16:
            u = o[:nv].view(np.uint32)
            for v in range(nv):
                u[v] = min((u[v] + np.uint32(0x7FFF) + ((u[v] >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000),
                           _BF16_MAX_BITS)

    @njit(parallel=True, **_jit)
    def epilogue_rows(d, lsb_num, lsb_den, noise_step, ly, key, noisy, count, sx, sw, y, b_off, M, m_off, inside):
        """``y[b, m, :] = sum_t ADC(d[b, t, m, :]) * sx[b, m, t] * sw[b or 0, t, :]``.

        ``d`` (b, T, m, N) tile products of a chunk of rows ``m_off ...`` of batches
        ``b_off ...`` of a (B, T, M, N) product; returns the number of clipped samples. With ``count``, a
        non-empty ``inside`` (uint8, one per sample of the (B, T, M, N) product, ones) gets 0 at
        every clipped sample (only for a row where the count found one).
        """
        b, T, m, N = d.shape
        shared = sw.shape[0] == 1
        clipped = 0
        for bm in prange(b * m):
            ib = bm // m
            im = bm % m
            out = y[ib, im]
            wb = sw[0] if shared else sw[b_off + ib]
            for j in range(N):
                out[j] = np.float32(0.0)
            for t in range(T):
                dt = d[ib, t, im]
                s = sx[ib, im, t]
                wt = wb[t]
                base = (((b_off + ib) * T + t) * M + m_off + im) * N
                c = 0
                for j in range(N):
                    r = _lsb(dt[j], lsb_num, lsb_den, noise_step, key, noisy, base + j)
                    if count:
                        c += abs(r) > ly
                    out[j] += (np.rint(min(max(r, -ly), ly)) * s) * wt[j]
                clipped += c
                if c > 0 and inside.size > 0:
                    for j in range(N):
                        if abs(_lsb(dt[j], lsb_num, lsb_den, noise_step, key, noisy, base + j)) > ly:
                            inside[base + j] = 0
        return clipped

    @njit(inline="always", **_jit)
    def _narrow_dots(x, ib, g0, g1, t, wt, j0, j1, dv):
        """``dv[r - g0, j] = D`` for rows ``g0 .. g1 - 1`` (at most 4) and columns ``j0 .. j1 - 1``
        of tile ``t``: float32 dot products of integer codes (exact, so in any order the
        GEMM's numbers); four rows share every weight load, two terms at a time."""
        n = wt.shape[0]
        nj = j1 - j0
        for rr in range(g1 - g0):
            d = dv[rr]
            for j in range(nj):
                d[j] = np.float32(0.0)
        if g1 - g0 == 4:
            x0 = x[ib, g0, t * n : t * n + n]
            x1 = x[ib, g0 + 1, t * n : t * n + n]
            x2 = x[ib, g0 + 2, t * n : t * n + n]
            x3 = x[ib, g0 + 3, t * n : t * n + n]
            d0, d1, d2, d3 = dv[0], dv[1], dv[2], dv[3]
            k = 0
            while k < n:
                k2 = min(k + 1, n - 1)
                h = np.float32(1.0) if k2 > k else np.float32(0.0)  # an odd last term: the second is 0
                wa, wb = wt[k, j0:j1], wt[k2, j0:j1]
                a0, a1, a2, a3 = x0[k], x1[k], x2[k], x3[k]
                b0, b1, b2, b3 = x0[k2] * h, x1[k2] * h, x2[k2] * h, x3[k2] * h
                for j in range(nj):
                    p = wa[j]
                    u = wb[j]
                    d0[j] += a0 * p + b0 * u
                    d1[j] += a1 * p + b1 * u
                    d2[j] += a2 * p + b2 * u
                    d3[j] += a3 * p + b3 * u
                k += 2
        else:
            for r in range(g0, g1):
                xr = x[ib, r, t * n : t * n + n]
                d = dv[r - g0]
                for k in range(n):
                    wa = wt[k, j0:j1]
                    c = xr[k]
                    for j in range(nj):
                        d[j] += c * wa[j]

    @njit(parallel=True, **_jit)
    def narrow_rows(x, sx, wc, sw, lsb_num, lsb_den, noise_step, ly, key, noisy, count, y, b_off, M, m_off, inside):
        """Tile products, ADC and tile sum in one pass, for narrow tiles (no partial sums in memory).

        ``x`` (b, m, T n) float32 input codes of rows ``m_off ...`` of batches ``b_off ...``
        of a (B, T, M, N) product; ``sx`` (b, m, T) their scales; ``wc`` (Bw, T, n, N) weight
        codes and ``sw`` (Bw, T, N) scales (Bw = 1: shared). Each work item takes
        :data:`NARROW_ROWS` rows by :data:`NARROW_COLS` columns: for ``t = 0, 1, ...`` the
        tile products ``D`` of its rows (:func:`_narrow_dots`, exact: the caller checks the
        bound) go through the ADC of :func:`epilogue_rows` and into the rows' sums, held in
        a small local block. ``y`` (b, m, N) receives the sums; returns the number of
        clipped samples (``count``; else 0); ``inside`` as :func:`epilogue_rows`'s.
        """
        b, m, _ = x.shape
        T, N = wc.shape[1], wc.shape[3]
        shared = wc.shape[0] == 1
        rb = (m + NARROW_ROWS - 1) // NARROW_ROWS
        cb = (N + NARROW_COLS - 1) // NARROW_COLS
        clipped = 0
        for item in prange(b * rb * cb):
            ib = item // (rb * cb)
            r0 = ((item // cb) % rb) * NARROW_ROWS
            j0 = (item % cb) * NARROW_COLS
            r1 = min(m, r0 + NARROW_ROWS)
            j1 = min(N, j0 + NARROW_COLS)
            nj = j1 - j0
            wb = 0 if shared else b_off + ib
            acc = np.zeros((min(NARROW_ROWS, r1 - r0), nj), np.float32)  # small products: small blocks
            dv = np.empty((4, nj), np.float32)
            nz = np.empty(nj + 8, np.float32)
            for t in range(T):
                w_scale = sw[wb, t, j0:j1]
                for g0 in range(r0, r1, 4):
                    g1 = min(r1, g0 + 4)
                    _narrow_dots(x, ib, g0, g1, t, wc[wb, t], j0, j1, dv)
                    for r in range(g0, g1):
                        d = dv[r - g0]
                        s = sx[ib, r, t]
                        out = acc[r - r0]
                        base = (((b_off + ib) * T + t) * M + m_off + r) * N + j0
                        off = _noise_run(key, base, nj, nz) if noisy else 0
                        c = 0
                        for j in range(nj):
                            v = (np.float32(d[j]) * lsb_num) / lsb_den  # as _lsb, the noise integers drawn above
                            if noisy:
                                v = v + nz[off + j] * noise_step
                            if count:
                                c += abs(v) > ly
                            out[j] += (np.rint(min(max(v, -ly), ly)) * s) * w_scale[j]
                        clipped += c
                        if c > 0 and inside.size > 0:  # the same samples again, marking the clipped ones
                            for j in range(nj):
                                v = (np.float32(d[j]) * lsb_num) / lsb_den
                                if noisy:
                                    v = v + nz[off + j] * noise_step
                                if abs(v) > ly:
                                    inside[base + j] = 0
            for r in range(r0, r1):
                dst = y[ib, r, j0:j1]
                src = acc[r - r0]
                for j in range(nj):
                    dst[j] = src[j]
        return clipped

    @njit(**_jit)
    def _mark_clipped(dv, lsb_num, lsb_den, noise_step, ly, key, noisy, base, real_pos, inside):
        """``inside[base + real_pos[v]] = 0`` where the sample of tile product ``dv[v]`` (real
        positions: ``real_pos[v] >= 0``) clips: :func:`_lsb` again, the same arithmetic as the
        epilogue's. Called only for a run of positions where a sample clipped (rare), so the
        epilogues' vector loops stay as they are."""
        for v in range(real_pos.shape[0]):
            if real_pos[v] >= 0:
                r = _lsb(dv[v], lsb_num, lsb_den, noise_step, key, noisy, base + real_pos[v])
                if abs(r) > ly:
                    inside[base + real_pos[v]] = 0

    @njit(parallel=True, **_jit)
    def epilogue_cols(d, lsb_num, lsb_den, noise_step, ly, key, noisy, count, sx, sw, y, virtual_w, real_pos, p_total, p_off,
                      inside):
        """The convolution's epilogue, written straight into the output.

        ``d`` (G, T, Ng, bc * out_h * virtual_w) tile products over virtual positions (output rows of
        ``virtual_w`` columns, of which the first ``wo`` are real); ``sx`` (T, G, bc * out_h * virtual_w);
        ``sw`` (G, T, Ng); ``y`` (bc, G * Ng, out_h, wo), any strides; ``real_pos`` (out_h * virtual_w) the
        index of each virtual position among one image's real ones times ``Ng``
        (``(h wo + w) Ng``; negative for the extra columns). The sample of output position ``p`` (``p_off`` + its index among the
        chunk's ``bc * out_h * wo``) has noise index ``((g T + t) p_total + p) Ng + o``. Every
        virtual position is computed (long contiguous loops); only real ones are written and
        counted. Returns the number of clipped samples (``count``; else 0); with ``count``, a
        non-empty ``inside`` (uint8, one per sample, by noise index, ones) gets 0 at every clipped
        sample (:func:`_mark_clipped`: only runs where the count found one). A wide plan's
        arguments (``lsb_num``, ``lsb_den``, ``ly`` float64) do the ADC step, noise, clamp and
        rounding in float64 (:func:`_lsb`); the code times the scales and the tile sum stay float32.
        """
        G, T, Ng, _ = d.shape
        bc, _, out_h, wo = y.shape
        lb = out_h * virtual_w
        clipped = 0
        for gob in prange(G * Ng * bc):
            g = gob // (Ng * bc)
            o = (gob // bc) % Ng
            ib = gob % bc
            acc = np.zeros(lb, np.float32)
            v0 = ib * lb
            for t in range(T):
                dt = d[g, t, o, v0 : v0 + lb]
                x_scale = sx[t, g, v0 : v0 + lb]
                wt = sw[g, t, o]
                base = ((g * T + t) * p_total + p_off + ib * out_h * wo) * Ng + o
                c = 0
                for v in range(lb):
                    r = _lsb(dt[v], lsb_num, lsb_den, noise_step, key, noisy, base + real_pos[v])
                    if count:
                        c += (abs(r) > ly) & (real_pos[v] >= 0)
                    acc[v] += (np.float32(np.rint(min(max(r, -ly), ly))) * x_scale[v]) * wt
                clipped += c
                if c > 0 and inside.size > 0:
                    _mark_clipped(dt, lsb_num, lsb_den, noise_step, ly, key, noisy, base, real_pos, inside)
            for h in range(out_h):
                row = y[ib, g * Ng + o, h]
                for w in range(wo):
                    row[w] = acc[h * virtual_w + w]
        return clipped

    @njit(parallel=True, **_jit)
    def epilogue_cols4(d, lsb_num, lsb_den, noise_step, ly, key, noisy, count, sx, sw, y, virtual_w, real_pos, p_total, p_off,
                       inside):
        """:func:`epilogue_cols` four output channels at a time, for ``Ng`` a multiple of 4
        (same arguments, same numbers). The noise of channels ``o0 .. o0 + 3`` (``o0`` a
        multiple of 4) at one position has indices ``4 i .. 4 i + 3``: the four 16-bit lanes
        of one splitmix64 output (:mod:`.counter_noise`), so one hash serves four samples."""
        G, T, Ng, _ = d.shape
        bc, _, out_h, wo = y.shape
        lb = out_h * virtual_w
        og = Ng // 4
        clipped = 0
        for item in prange(G * og * bc):
            g = item // (og * bc)
            o0 = ((item // bc) % og) * 4
            ib = item % bc
            acc = np.zeros((4, lb), np.float32)
            nz = np.zeros((4, lb), np.float32)
            v0 = ib * lb
            for t in range(T):
                x_scale = sx[t, g, v0 : v0 + lb]
                base = ((g * T + t) * p_total + p_off + ib * out_h * wo) * Ng + o0
                if noisy:
                    for v in range(lb):  # extra columns (real_pos < 0): any value, never used
                        z = splitmix64(key, np.uint64(max(base + real_pos[v], 0) >> 2) + np.uint64(1))
                        for lane in range(4):
                            u = np.int64((z >> np.uint64(16 * lane)) & np.uint64(0xFFFF))
                            nz[lane, v] = np.float32(((u ^ 0x8000) - 0x8000) | 1)
                for lane in range(4):
                    dt = d[g, t, o0 + lane, v0 : v0 + lb]
                    wt = sw[g, t, o0 + lane]
                    a = acc[lane]
                    e = nz[lane]
                    c = 0
                    for v in range(lb):
                        r = (np.float32(dt[v]) * lsb_num) / lsb_den  # as _lsb, with the noise integers above
                        if noisy:
                            r = r + e[v] * noise_step
                        if count:
                            c += (abs(r) > ly) & (real_pos[v] >= 0)
                        a[v] += (np.rint(min(max(r, -ly), ly)) * x_scale[v]) * wt
                    clipped += c
                    if c > 0 and inside.size > 0:  # the same samples again, marking the clipped ones
                        for v in range(lb):
                            r = (np.float32(dt[v]) * lsb_num) / lsb_den
                            if noisy:
                                r = r + e[v] * noise_step
                            if abs(r) > ly and real_pos[v] >= 0:
                                inside[base + lane + real_pos[v]] = 0
            for lane in range(4):
                a = acc[lane]
                for h in range(out_h):
                    row = y[ib, g * Ng + o0 + lane, h]
                    for w in range(wo):
                        row[w] = a[h * virtual_w + w]
        return clipped

    @njit(fastmath={"contract"}, **_jit)
    def _dot8(x0, x1, x2, x3, x4, x5, x6, x7, w0, w1, w2, w3, w4, w5, w6, w7):
        """``sum_k x_k w_k`` of one tile of width 8, contracted to fused multiply-adds: exact
        either way on DAC codes (integers times a power of two, every partial sum exact in
        float32: :attr:`AdcPlan.gemm_dtype`), so the GEMM's numbers. Not inlined by numba:
        LLVM inlines it with its ``contract`` flags, which then stay off the ADC's arithmetic."""
        return x0 * w0 + x1 * w1 + x2 * w2 + x3 * w3 + x4 * w4 + x5 * w5 + x6 * w6 + x7 * w7

    @njit(inline="always", **_jit)
    def _adc1(d, lsb_den, h, noise_step, noisy, ly, s, w):
        """One sample's ADC (:func:`epilogue_cols4`'s arithmetic, ``lsb_num`` = 1): ``(code * s)
        * w`` and whether it clipped; the noise integer is the low 16 bits of ``h`` (uint32),
        made odd, as a signed number (32-bit operations: they vectorise at twice the width)."""
        r = d / lsb_den
        if noisy:
            r = r + np.float32(np.int16(h | np.uint32(1))) * noise_step
        return (np.rint(min(max(r, -ly), ly)) * s) * w, abs(r) > ly

    @njit(inline="always", **_jit)
    def _tile8(cg, k0, p0, p1, xs, wq, sq, acc, q4, hg, real, kb, lsb_den, noise_step, ly, noisy, count):
        """One tile of width 8 for four output channels over a stripe of positions: the tile
        products ``D`` of the patch codes ``cg[k0 + k, p0:p1]`` (``k < 8``) against ``wq`` (8, 4)
        weight codes, exact float32 sums kept in registers, then the ADC of
        :func:`epilogue_cols4` (noise of position ``v``: the splitmix64 output
        ``mix(kb + hg[v])``, its four lanes the four channels) and ``acc[q4 + lane, v] +=
        (code * xs[v]) * sq[lane]``; returns the clipped samples of real positions
        (``real[v]``). ``noisy`` and ``count`` are constants where it is inlined, so each
        combination compiles to its own vector loop. Every array it loops over is a
        contiguous 1-D view (a strided one would not vectorise)."""
        c0, c1, c2, c3 = cg[k0][p0:p1], cg[k0 + 1][p0:p1], cg[k0 + 2][p0:p1], cg[k0 + 3][p0:p1]
        c4, c5, c6, c7 = cg[k0 + 4][p0:p1], cg[k0 + 5][p0:p1], cg[k0 + 6][p0:p1], cg[k0 + 7][p0:p1]
        aq = acc[q4 : q4 + 4]  # (rows of one slice: indexing acc by q4 + i keeps the loop scalar)
        a0, a1, a2, a3 = aq[0], aq[1], aq[2], aq[3]
        w00, w01, w02, w03 = wq[0, 0], wq[0, 1], wq[0, 2], wq[0, 3]
        w10, w11, w12, w13 = wq[1, 0], wq[1, 1], wq[1, 2], wq[1, 3]
        w20, w21, w22, w23 = wq[2, 0], wq[2, 1], wq[2, 2], wq[2, 3]
        w30, w31, w32, w33 = wq[3, 0], wq[3, 1], wq[3, 2], wq[3, 3]
        w40, w41, w42, w43 = wq[4, 0], wq[4, 1], wq[4, 2], wq[4, 3]
        w50, w51, w52, w53 = wq[5, 0], wq[5, 1], wq[5, 2], wq[5, 3]
        w60, w61, w62, w63 = wq[6, 0], wq[6, 1], wq[6, 2], wq[6, 3]
        w70, w71, w72, w73 = wq[7, 0], wq[7, 1], wq[7, 2], wq[7, 3]
        s0, s1, s2, s3 = sq[0], sq[1], sq[2], sq[3]
        clipped = 0
        lo = hi = np.uint32(0)
        for v in range(xs.shape[0]):
            x0, x1, x2, x3, x4, x5, x6, x7 = c0[v], c1[v], c2[v], c3[v], c4[v], c5[v], c6[v], c7[v]
            s = xs[v]
            if noisy:  # splitmix64(key, counter) with key + counter * golden precomputed as kb + hg[v]
                z = kb + hg[v]
                z = (z ^ (z >> np.uint64(30))) * _MIX1
                z = (z ^ (z >> np.uint64(27))) * _MIX2
                z = z ^ (z >> np.uint64(31))
                lo = np.uint32(z & np.uint64(0xFFFFFFFF))
                hi = np.uint32(z >> np.uint64(32))
            d0 = _dot8(x0, x1, x2, x3, x4, x5, x6, x7, w00, w10, w20, w30, w40, w50, w60, w70)
            d1 = _dot8(x0, x1, x2, x3, x4, x5, x6, x7, w01, w11, w21, w31, w41, w51, w61, w71)
            d2 = _dot8(x0, x1, x2, x3, x4, x5, x6, x7, w02, w12, w22, w32, w42, w52, w62, w72)
            d3 = _dot8(x0, x1, x2, x3, x4, x5, x6, x7, w03, w13, w23, w33, w43, w53, w63, w73)
            y0, o0 = _adc1(d0, lsb_den, lo, noise_step, noisy, ly, s, s0)
            y1, o1 = _adc1(d1, lsb_den, lo >> np.uint32(16), noise_step, noisy, ly, s, s1)
            y2, o2 = _adc1(d2, lsb_den, hi, noise_step, noisy, ly, s, s2)
            y3, o3 = _adc1(d3, lsb_den, hi >> np.uint32(16), noise_step, noisy, ly, s, s3)
            a0[v] += y0
            a1[v] += y1
            a2[v] += y2
            a3[v] += y3
            if count:
                clipped += (np.int64(o0) + np.int64(o1) + np.int64(o2) + np.int64(o3)) * np.int64(real[v])
        return clipped

    @njit(**_jit)
    def _mark8(cg, k0, p0, p1, wq, hg, kb, lsb_den, noise_step, ly, noisy, base, lb, image_stride, real_pos, inside):
        """``inside[base + ib image_stride + real_pos[v - ib lb] + lane] = 0`` where the sample of
        channel ``lane`` at position ``v`` (image ``ib``) of :func:`_tile8`'s stripe clips: its tile
        products and ADC again (:func:`_dot8`, :func:`_adc1`: the same numbers), one position at a
        time; only for a stripe where one clipped."""
        for v in range(p0, p1):
            ib = v // lb
            rp = real_pos[v - ib * lb]
            if rp < 0:
                continue
            x = cg[k0 : k0 + 8, v]
            z = kb + hg[v - p0]
            z = (z ^ (z >> np.uint64(30))) * _MIX1
            z = (z ^ (z >> np.uint64(27))) * _MIX2
            z = z ^ (z >> np.uint64(31))
            lo = np.uint32(z & np.uint64(0xFFFFFFFF))
            hi = np.uint32(z >> np.uint64(32))
            hs = (lo, np.uint32(lo >> np.uint32(16)), hi, np.uint32(hi >> np.uint32(16)))
            for lane in range(4):
                d = _dot8(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], wq[0, lane], wq[1, lane], wq[2, lane],
                          wq[3, lane], wq[4, lane], wq[5, lane], wq[6, lane], wq[7, lane])
                _, out = _adc1(d, lsb_den, hs[lane], noise_step, noisy, ly, np.float32(1.0), np.float32(1.0))
                if out:
                    inside[base + ib * image_stride + rp + lane] = 0

    @njit(parallel=True, **_jit)
    def narrow_cols8(codes, wc, lsb_num, lsb_den, noise_step, ly, key, noisy, count, sx, sw, y, virtual_w, real_pos,
                     p_total, p_off, stripe, inside):
        """A convolution's tile products, ADC and tile sum in one pass for tiles of width 8
        and ``Ng`` a multiple of 4: the numbers of the batched GEMM plus :func:`epilogue_cols4`
        (same arguments, but ``codes`` (G, 8 T, bc * out_h * virtual_w) float32 patch codes,
        rows past the reduction zero, and ``wc`` (G, T, 8, Ng) float32 weight codes in place
        of the tile products; ``lsb_num`` must be 1; ``stripe``: positions per work item). A
        work item is a group and a stripe of the chunk's virtual positions (across output
        rows and images): for ``t = 0, 1, ...`` and four channels at a time (:func:`_tile8`)
        the tile products stay in registers, no ``(T, Ng, positions)`` tensor is written, and
        the sums of all the group's channels over the stripe stay in a local block. ``inside``: as
        :func:`epilogue_cols`'s (:func:`_mark8` where a stripe's tile clipped)."""
        G, T, _, Ng = wc.shape
        bc, _, out_h, wo = y.shape
        lb = out_h * virtual_w
        ns = (bc * lb + stripe - 1) // stripe
        og = Ng // 4
        clipped = 0
        for item in prange(G * ns):
            g = item // ns
            p0 = (item % ns) * stripe
            p1 = min(bc * lb, p0 + stripe)
            acc = np.zeros((Ng, p1 - p0), np.float32)
            hg = np.empty(p1 - p0, np.uint64)
            real = np.empty(p1 - p0, np.uint8)
            stripe_positions(p0, p1, lb, out_h, wo, Ng, real_pos, hg, real)
            cg = codes[g]
            for t in range(T):
                xs = sx[t, g][p0:p1]
                base = ((g * T + t) * p_total + p_off) * Ng
                for q in range(og):
                    wq = wc[g, t, :, 4 * q : 4 * q + 4]
                    sq = sw[g, t, 4 * q : 4 * q + 4]
                    kb = key + np.uint64(((base + 4 * q) >> 2) + 1) * _GOLDEN
                    k0, q4 = 8 * t, 4 * q
                    if noisy and count:  # constant flags: four vector loops
                        c = _tile8(cg, k0, p0, p1, xs, wq, sq, acc, q4, hg, real, kb, lsb_den, noise_step, ly, True, True)
                        clipped += c
                        if c > 0 and inside.size > 0:
                            _mark8(cg, k0, p0, p1, wq, hg, kb, lsb_den, noise_step, ly, True, base + q4, lb,
                                   out_h * wo * Ng, real_pos, inside)
                    elif noisy:
                        _tile8(cg, k0, p0, p1, xs, wq, sq, acc, q4, hg, real, kb, lsb_den, noise_step, ly,
                               True, False)
                    elif count:
                        c = _tile8(cg, k0, p0, p1, xs, wq, sq, acc, q4, hg, real, kb, lsb_den, noise_step, ly, False, True)
                        clipped += c
                        if c > 0 and inside.size > 0:
                            _mark8(cg, k0, p0, p1, wq, hg, kb, lsb_den, noise_step, ly, False, base + q4, lb,
                                   out_h * wo * Ng, real_pos, inside)
                    else:
                        _tile8(cg, k0, p0, p1, xs, wq, sq, acc, q4, hg, real, kb, lsb_den, noise_step, ly,
                               False, False)
            stripe_out(acc, y, g, p0, p1, lb, virtual_w)
        return clipped

    @njit(inline="always", **_jit)
    def stripe_positions(p0, p1, lb, out_h, wo, Ng, real_pos, hg, real):
        """For the virtual positions ``p0 .. p1 - 1`` of a stripe (images of ``lb`` positions):
        ``hg[v - p0]`` the position's uniform-noise hash counter (less the tile's and the
        channel group's) times golden, ``real[v - p0]`` whether it is a real output position."""
        for v in range(p0, p1):
            ib = v // lb
            rp = real_pos[v - ib * lb]
            hg[v - p0] = np.uint64((ib * out_h * wo * Ng + max(rp, 0)) >> 2) * _GOLDEN
            real[v - p0] = rp >= 0

    @njit(inline="always", **_jit)
    def stripe_out(acc, y, g, p0, p1, lb, virtual_w):
        """``y[ib, g Ng + o, h, w] = acc[o, v - p0]`` for the real positions ``v`` of a stripe
        ``p0 .. p1 - 1``, row by row (an integer division per element is slow)."""
        Ng = acc.shape[0]
        wo = y.shape[3]
        v = p0
        while v < p1:  # row by row: the real columns of output row h of image ib
            ib = v // lb
            h = (v - ib * lb) // virtual_w
            r0 = ib * lb + h * virtual_w  # the row's first position
            w0, w1 = v - r0, min(wo, p1 - r0)
            for o in range(Ng):
                dst = y[ib, g * Ng + o, h]
                src = acc[o]
                for w in range(w0, w1):
                    dst[w] = src[r0 + w - p0]
            v = r0 + virtual_w

    @njit(parallel=True, **_jit)
    def patch_encode(xs, k_src, k_off, kg, n, bf16, lx, clamp, out_s, out):
        """Block scales and DAC codes of a convolution's patches, one tile at a time.

        The patch value of reduction index ``k`` (group ``g``: ``g kg + t n ...`` in tile
        ``t``) at virtual position ``v`` is ``xs[k_src[k], b, k_off[k] + v]``. The block max
        ``out_s[t, g, b, v] = max |patch|`` over the tile is put in the scale format
        (``bf16``: rounded to nearest even bfloat16 as torch converts; else float32 as it
        is), then ``out[g, k - g kg, b L + v]`` receives the codes as :func:`patch_codes`
        writes them with these scales (clamped where ``clamp`` says, and in every tile with
        a subnormal scale: see :func:`abfp.numerics.blocks.codes_`)."""
        T, G, B, L = out_s.shape
        _, B3, L3 = xs.shape
        xf = xs.reshape(xs.size)
        for bgt in prange(B * G * T):  # tiles of one block in turn: the threads share the short last tile
            b = bgt // (G * T)
            g = (bgt // T) % G
            t = bgt % T
            o = out_s[t, g, b]
            k0 = g * kg + t * n
            k1 = g * kg + min(kg, t * n + n)
            _block_scales(xf, k_src, k_off, k0, k1, B3 * L3, b * L3, L, bf16, o)
            cl = clamp
            if not cl:  # a subnormal or saturated scale may sit far below its block's max: clamp this tile
                for v in range(L):
                    if (o[v] > 0 and o[v] < _MIN_NORMAL) or o[v] >= _SCALE_CLAMP_FROM:
                        cl = True
                        break
            for k in range(k0, k1):
                off = k_off[k]
                src = xs[k_src[k], b, off : off + L]
                dst = out[g, k - g * kg, b * L : (b + 1) * L]
                _dac(src, o, lx, cl, dst)

    @njit(parallel=True, **_jit)
    def patch_codes(xs, k_src, k_off, kg, n, s, lx, clamp, out):
        """DAC codes of a convolution's patches: ``out[g, k, b L + v] = round(clamp(x / s, -1,
        1) * lx)`` with ``s = s[t, g, b, v]`` the block's scale (0: the code is 0); the clamp
        runs only where asked (it cannot change a code when ``s`` is the block's own max)."""
        T, G, B, L = s.shape
        for gkb in prange(G * kg * B):
            g = gkb // (kg * B)
            kk = (gkb // B) % kg
            b = gkb % B
            k = g * kg + kk
            sc = s[kk // n, g, b]
            off = k_off[k]
            src = xs[k_src[k], b, off : off + L]
            dst = out[g, kk, b * L : (b + 1) * L]
            _dac(src, sc, lx, clamp, dst)

    @njit(parallel=True, **_jit)
    def grouped_direct(xf, src_stride, image_len, k_src, k_off, kg, n, bf16, static, lx, wc, sw, lsb_num, lsb_den,
                       noise_step, ly, key, noisy, count, y, virtual_w, real_pos, p_total, p_off, block, inside):
        """A grouped (depthwise) convolution in one pass, no patch matrix, no partial sums in memory.

        For each group ``g`` and image ``ib`` (one work item), a few output rows at a time, over
        the virtual positions ``v`` of :func:`epilogue_cols` (rows of ``virtual_w``; the patch
        value of reduction index ``k`` is ``xf[k_src[k] src_stride + ib image_len + k_off[k] + v]``,
        ``xf`` the phase images flat, as :func:`patch_encode` reads them): per tile ``t`` the block
        scales (bfloat16 or float32 as ``bf16`` says, or the fixed-mode scale ``static`` when it
        is not negative), each index's DAC codes (:func:`_code`, always clamped: where the clamp
        is not needed it changes no code), their exact tile products ``D`` with the group's weight
        codes ``wc`` (G, T, n, Ng) in ``wc``'s dtype (float32 or float64: the GEMM's exact
        integers), then the ADC and the float32 tile sum of :func:`epilogue_cols` (same noise
        index ``base + real_pos[v]``, same operations in the same order), written into ``y``
        (bc, G Ng, out_h, wo). Every loop runs over whole :data:`DIRECT_LANES` vectors (short
        rows of small images would otherwise leave most of the work to scalar remainders): the
        positions past a block's end are computed from whatever values lie there (``xf`` has
        that much slack after its last image; ``real_pos`` is negative there) and dropped, as the
        extra columns are. ``block``: values per block of output rows (:data:`DIRECT_ELEMENTS`).
        Returns the number of clipped samples (``count``; else 0); ``inside`` as :func:`epilogue_cols`'s."""
        G = wc.shape[0]
        bc = y.shape[0]
        items = G * bc
        per = (items + DIRECT_ITEMS - 1) // DIRECT_ITEMS  # work items per task: scratch allocated once each
        clipped = 0
        for task in prange((items + per - 1) // per):
            clipped += _direct_task(task * per, min(items, task * per + per), xf, src_stride, image_len, k_src, k_off,
                                    kg, n, bf16, static, lx, wc, sw, lsb_num, lsb_den, noise_step, ly, key, noisy,
                                    count, y, virtual_w, real_pos, p_total, p_off, block, inside)
        return clipped

    @njit(**_jit)
    def _direct_task(i0, i1, xf, src_stride, image_len, k_src, k_off, kg, n, bf16, static, lx, wc, sw, lsb_num,
                     lsb_den, noise_step, ly, key, noisy, count, y, virtual_w, real_pos, p_total, p_off, block, inside):
        """Work items ``i0 .. i1 - 1`` (group ``i // bc``, image ``i % bc``) of :func:`grouped_direct`:
        a function of its own, compiled without the parallel loop's lowering (whose body loops
        vectorise worse: 1.5x slower on one thread)."""
        G, T, _, Ng = wc.shape
        bc, _, out_h, wo = y.shape
        kt = min(n, kg)
        rows = max(1, min(out_h, block // (virtual_w * max(kt, Ng))))
        seg = (rows * virtual_w + DIRECT_LANES - 1) // DIRECT_LANES * DIRECT_LANES
        clipped = 0
        s = np.empty(seg, np.float32)
        c = np.empty(seg, wc.dtype)
        d = np.empty((Ng, seg), wc.dtype)
        acc = np.empty((Ng, seg), np.float32)
        for gb in range(i0, i1):
            g = gb // bc
            ib = gb % bc
            for h0 in range(0, out_h, rows):
                nh = min(rows, out_h - h0)
                v0 = h0 * virtual_w
                nv = (nh * virtual_w + DIRECT_LANES - 1) // DIRECT_LANES * DIRECT_LANES
                start = ib * image_len + v0
                for o in range(Ng):
                    for v in range(nv):
                        acc[o, v] = np.float32(0.0)
                for t in range(T):
                    k0 = g * kg + t * n
                    k1 = g * kg + min(kg, t * n + n)
                    if static >= 0:
                        for v in range(nv):
                            s[v] = static
                    else:
                        _block_scales(xf, k_src, k_off, k0, k1, src_stride, start, nv, bf16, s)
                    for o in range(Ng):
                        for v in range(nv):
                            d[o, v] = 0
                    for k in range(k0, k1):
                        j0 = k_src[k] * src_stride + start + k_off[k]
                        src = xf[j0 : j0 + nv]
                        if Ng == 1:  # depthwise: the codes straight into the one product
                            w = wc[g, t, k - k0, 0]
                            d0 = d[0]
                            for v in range(nv):
                                d0[v] += _code(src[v], s[v], lx, True) * w
                        else:
                            for v in range(nv):
                                c[v] = _code(src[v], s[v], lx, True)
                            for o in range(Ng):
                                w = wc[g, t, k - k0, o]
                                do = d[o]
                                for v in range(nv):
                                    do[v] += c[v] * w
                    for o in range(Ng):
                        wt = sw[g, t, o]
                        do = d[o]
                        ao = acc[o]
                        base = ((g * T + t) * p_total + p_off + ib * out_h * wo) * Ng + o
                        rp = real_pos[v0 : v0 + nv]
                        cl = 0
                        for v in range(nv):
                            r = _lsb(do[v], lsb_num, lsb_den, noise_step, key, noisy, base + rp[v])
                            if count:
                                cl += (abs(r) > ly) & (rp[v] >= 0)
                            ao[v] += (np.float32(np.rint(min(max(r, -ly), ly))) * s[v]) * wt
                        clipped += cl
                        if cl > 0 and inside.size > 0:
                            _mark_clipped(do, lsb_num, lsb_den, noise_step, ly, key, noisy, base, rp, inside)
                for o in range(Ng):
                    ao = acc[o]
                    for h in range(nh):
                        row = y[ib, g * Ng + o, h0 + h]
                        for w in range(wo):
                            row[w] = ao[h * virtual_w + w]
        return clipped

    @njit(parallel=True, fastmath={"nnan", "ninf", "nsz"}, **_jit)
    def rows_block_max(x, n, out):
        """``out[r, t] = max |x[r, t n : t n + n]|`` (rows of a product's left operand)."""
        R, K = x.shape
        T = out.shape[1]
        for r in prange(R):
            row = x[r]
            for t in range(T):
                seg = row[t * n : min(K, t * n + n)]
                m = np.float32(0.0)
                for k in range(seg.shape[0]):
                    m = max(m, abs(seg[k]))
                out[r, t] = m

    @njit(parallel=True, **_jit)
    def rows_codes(x, n, s, lx, clamp, out):
        """DAC codes of rows: ``out[r, t n + k] = round(clamp(x / s[r, t], -1, 1) * lx)`` (0
        where the scale is 0, and in the zero padding past ``K``); ``out`` (R, T n)."""
        R, K = x.shape
        T = s.shape[1]
        for r in prange(R):
            row = x[r]
            dst = out[r]
            for t in range(T):
                sc = s[r, t]
                k1 = min(K, t * n + n)
                seg = row[t * n : k1]
                d = dst[t * n : t * n + n]
                for k in range(seg.shape[0]):
                    d[k] = _code(seg[k], sc, lx, clamp)
                for k in range(seg.shape[0], n):
                    d[k] = 0
