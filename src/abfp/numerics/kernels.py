"""The fast path: exact GEMMs on DAC codes, the per-tile ADC as an in-place epilogue, in chunks.

For each chunk of rows, ``D = codes_x @ codes_w`` gives every tile's integer dot product:
one int8 GEMM per tile with exact int32 sums (``torch._int_mm``, where :func:`use_int8`
says it gains) or one batched float32 GEMM over the tiles (exact too: the products are
integers below 2**24). The epilogue (:func:`adc_`) turns them into ADC codes and numbers in
place and the tiles are summed in float32. Chunks are sized so that the ``(T, rows, N)``
partial sums stay small (never the whole tensor of a large layer), which also keeps them
in cache; temporaries live in reused scratch buffers (:mod:`.workspace`).

The epilogue runs as a compiled kernel (:mod:`.fused`, numba) where :func:`use_fused` allows,
and as the torch operations here otherwise: the same numbers (``tests/numerics/test_fused.py``).
Uniform device noise is counter-based (:mod:`.counter_noise`): one key per product, and a
value per sample that depends only on the sample's index in the product.

:func:`analog_gemm` takes rows (linear layers, attention); :func:`analog_gemm_cols` takes
the reduction axis first (convolutions at inference). Tested against
:mod:`abfp.numerics.reference` and against each other (``tests/numerics``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..config import ABFPConfig
from . import fused, vnni8
from .adc import AdcPlan, add_noise_, code_gemm_dtype, effective_noise_std
from .blocks import Encoded, codes_, encode_rows, has_subnormal, needs_clamp, round_scale
from .counter_noise import grid_index, noise_key, noise_scale
from .workspace import scratch

#: Elements of partial sums per chunk (float32): 512 Ki elements = 2 MiB.
CHUNK_ELEMENTS = 1 << 19

#: Smallest GEMM (multiply-accumulates per call) that runs on int8: below it the per-call
#: overhead of one ``torch._int_mm`` per tile outweighs its speed, and one batched float32
#: GEMM is faster.
INT8_MIN_MACS = 1 << 18
#: Narrowest tile that runs on int8: with a short reduction the GEMM is bound by its int32
#: output, and one batched float32 GEMM over all tiles wins (measured: n = 8 and 16 lose,
#: n = 32 ties, n >= 64 wins by 1.5-2x; ``benchmarks/bench_linear.py``).
INT8_MIN_TILE = 32
#: Tiles narrower than this run the tile products inside the compiled epilogue
#: (:func:`.fused.narrow_rows`): with a short reduction a GEMM is bound by writing its
#: ``(T, rows, N)`` partial sums, which the fused kernel never stores.
NARROW_MAX_TILE = 32
#: Tiles of width 8 on a CPU with AVX-512 VNNI, DACs of at most 8
#: bits and :meth:`AdcPlan.int_ratio`'s multiplier 1: :func:`.vnni8.narrow_rows8_vnni` (int8 dot
#: products) in place of :func:`.fused.narrow_rows`; ``False``: the latter, its reference (same
#: numbers, tested).
VNNI8 = True


def int8_gemm_is_fast() -> bool:
    """Whether ``torch._int_mm`` is fast on this CPU: oneDNN's int8 GEMM needs AVX-512 VNNI;
    without it torch runs a scalar loop, 20-50x *slower* than a float32 GEMM (measured on an
    AVX2-only AMD EPYC: 2048x128 @ 128x16 9.9 ms against 0.41 ms in float32; 5-9x faster than
    float32 with VNNI). ``ABFP_INT8_GEMM=1`` or ``=0`` overrides the detection. Either choice
    gives the same numbers (both GEMMs are exact on DAC codes)."""
    env = os.environ.get("ABFP_INT8_GEMM", "")
    if env in ("0", "1"):
        return env == "1"
    try:
        return bool(torch.cpu._is_vnni_supported())
    except Exception:  # a torch without the query: the float32 GEMM, always fast
        return False


#: ``torch._int_mm`` is fast on this CPU (:func:`int8_gemm_is_fast`); else the tile products
#: run as float32 GEMMs even where the codes fit in int8.
INT8_GEMM = int8_gemm_is_fast()


def int8_tiles(plan: AdcPlan, w: Encoded) -> bool:
    """Whether this CPU's tile products against ``w`` may run as int8 GEMMs: the plan allows
    it (:attr:`AdcPlan.int8`), ``w`` has int8 codes, the tiles are at least
    :data:`INT8_MIN_TILE` wide and the int8 GEMM is fast here (:data:`INT8_GEMM`)."""
    return INT8_GEMM and plan.int8 and w.codes_i8 is not None and w.codes.shape[2] >= INT8_MIN_TILE


def use_int8(w: Encoded, plan: AdcPlan, rows: int) -> bool:
    """Whether tile products of ``rows`` rows against ``w`` run as int8 GEMMs (exact int32
    sums: ``torch._int_mm``, CPU): :func:`int8_tiles`, and the GEMM has at least
    :data:`INT8_MIN_MACS` multiply-accumulates."""
    n, N = w.codes.shape[2], w.codes.shape[3]
    return int8_tiles(plan, w) and rows * n * N >= INT8_MIN_MACS


@dataclass
class ProductStats:
    """ADC statistics of one product: saturated (clipped) samples out of all ADC samples."""

    saturated: int = 0
    conversions: int = 0


def adc_(
    d: Tensor,
    cfg: ABFPConfig,
    plan: AdcPlan,
    *,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    key: int | None = None,
    index: Tensor | None = None,
    stats: ProductStats | None = None,
    mask_out: Tensor | None = None,
    in_lsb: bool = False,
) -> Tensor:
    """The ADC on integer tile products ``d`` (times ``plan.code_multiplier``), in place where
    it can: ``qy = round(clamp(d * G L(b_y) / (n L(b_x) L(b_w)) + e, -L(b_y), L(b_y)))``.

    Returns the output codes in float32 (a new tensor only in the wide form). ``noise``
    (broadcastable to ``d``) replaces the device noise ``e``, else uniform noise comes from
    ``key`` and the samples' flat ``index`` (:mod:`.counter_noise`), Gaussian noise from
    ``generator``; ``mask_out`` receives
    ``|a L(b_y)| <= L(b_y)`` (not clipped) and ``stats`` counts the clipped samples.
    ``in_lsb``: ``d`` is already in LSBs (:meth:`AdcPlan.int_to_lsb`).
    """
    ly = float(plan.max_code)
    if plan.wide and d.dtype != torch.float64:
        d = d.to(torch.float64)
    if not in_lsb:
        plan.to_lsb_(d)
    if noise is not None:
        d.add_(noise)
    elif cfg.noise_std > 0:
        add_noise_(d, cfg, generator, key, index)
    if stats is not None or mask_out is not None:
        inside = d.abs() <= ly
        if mask_out is not None:
            mask_out.copy_(inside)
        if stats is not None:
            stats.saturated += int(inside.numel() - inside.sum())
            stats.conversions += inside.numel()
    d.clamp_(-ly, ly).round_()
    return d.to(torch.float32) if d.dtype != torch.float32 else d


def analog_gemm(
    x3: Tensor,
    w: Encoded,
    cfg: ABFPConfig,
    plan: AdcPlan,
    *,
    input_scale: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    stats: ProductStats | None = None,
    want_mask: bool = False,
    chunk_elements: int | None = None,
    key: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Sum over tiles of the ADC'd tile products of ``x3`` (B, M, K) with encoded weights.

    Inputs are encoded chunk by chunk (rows of M), so no full-size code tensor is ever
    built. ``w.codes``: (Bw, T, n, N) with Bw in (1, B), already times
    ``plan.code_multiplier``; ``w.scales`` (Bw, T, N) already times ``plan.step``.
    ``input_scale``: the fixed-mode static scale (0-d, in the scale format). ``noise``:
    optional explicit noise (B, T, M, N) in LSBs (tests); else uniform noise has index
    ``((b T + t) M + m) N + j`` under one key drawn from ``generator`` (or ``key``, when given). Returns ``Y`` (B, M, N)
    float32 and, with ``want_mask``, the straight-through mask (B, T, M, N) bool (True: not
    clipped). The epilogue runs compiled (:mod:`.fused`) where it can, with the same numbers.
    """
    wc = w.codes
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    B, M, K = x3.shape
    T, n, N = wc.shape[1], wc.shape[2], wc.shape[3]
    dev = x3.device
    y = torch.empty(B, M, N, dtype=torch.float32, device=dev)
    mask = torch.empty(B, T, M, N, dtype=torch.bool, device=dev) if want_mask else None
    if T == 0 or M == 0 or N == 0 or B == 0:
        y.zero_()
        if mask is not None:
            mask.fill_(True)
        return y, mask
    if noise is not None:
        key = None
    elif key is None:
        key = draw_key(cfg, generator)
    # code_dtype: the dtype of the code GEMM (float32 or float64: whichever sums the tile products exactly)
    code_dtype = code_gemm_dtype(plan, dev, cfg.weight_max_code, cfg.input_max_code)
    compiled = noise is None and use_fused(cfg, plan, dev)
    count = stats is not None or want_mask  # the compiled kernels mark the clipped samples they count
    inside = _NO_MASK
    if compiled:
        fused.set_threads()
        if mask is not None:
            inside = fused.as_numpy(mask.fill_(True).view(-1).view(torch.uint8))
    sw_all = w.scales  # (Bw, T, N)
    narrow = compiled and n < NARROW_MAX_TILE and code_dtype == torch.float32
    # (not where a clamp mask is wanted: the VNNI kernel does not mark clipped samples, the
    # float32 narrow kernel does)
    vnni = (narrow and n == 8 and VNNI8 and vnni8.USABLE and w.codes_i8 is not None and plan.int8
            and plan.int_ratio()[0] == 1.0 and not want_mask)
    if vnni and w.vnni_rows is None:  # packed once per weight encoding (it is cached with the weights)
        w.vnni_rows = vnni8.pack_rows(w.codes_i8, w.scales)
    # rows per chunk: bounded by the partial sums (T*N per row; none in the narrow kernel) and
    # the input codes (T*n per row)
    chunks = plan_chunks(B, M, chunk_elements // (T * (n if narrow else max(N, n))))
    for b0, b1, m0, m1 in chunks:
        b, m = b1 - b0, m1 - m0
        if vnni:  # the same, on int8 codes with VNNI dot products
            codes, sx = _encode_rows_compiled(x3[b0:b1, m0:m1], n, T, cfg, input_scale, True)
            c8 = codes.view(b, m, T * n)
            adc = _adc_args(cfg, plan, 1.0, plan.int_ratio()[1], key, stats is not None)[1:]
            clipped = vnni8.narrow_rows8_vnni(
                fused.as_numpy(c8), fused.as_numpy(c8.view(torch.int32)), fused.as_numpy(sx),
                fused.as_numpy(w.vnni_rows[0]), fused.as_numpy(w.vnni_rows[1]), *adc,
                fused.as_numpy(y[b0:b1, m0:m1]), b0, M, m0)
            _count(stats, clipped, b * T * m * N)
            continue
        if narrow:  # tile products, ADC and tile sum in one kernel
            codes, sx = _encode_rows_compiled(x3[b0:b1, m0:m1], n, T, cfg, input_scale, False)
            clipped = fused.narrow_rows(
                fused.as_numpy(codes.view(b, m, T * n)), fused.as_numpy(sx), fused.as_numpy(wc), fused.as_numpy(sw_all),
                *_adc_args(cfg, plan, 1.0, plan.divisor, key, count), fused.as_numpy(y[b0:b1, m0:m1]),
                b0, M, m0, inside)
            _count(stats, clipped, b * T * m * N)
            continue
        int8 = use_int8(w, plan, m)
        if compiled:
            codes, sx = _encode_rows_compiled(x3[b0:b1, m0:m1], n, T, cfg, input_scale, int8)
        else:
            codes, sx = encode_rows(x3[b0:b1, m0:m1], n=n, max_code=cfg.input_max_code, mode=cfg.mode,
                                    scale_dtype=cfg.scale_dtype, static_scale=input_scale,
                                    buffer=scratch("codes", (b, m, T * n), torch.float32, dev))
        if int8:
            d = _int8_tile_products(codes, w.codes_i8, b0, plan, raw=compiled)  # (b, T, m, N)
        else:
            xs = codes.permute(0, 2, 1, 3)  # (b, T, m, n) view: the GEMM takes the strides as they are
            ws = wc if wc.shape[0] == 1 else wc[b0:b1]
            d = scratch("tiles", (b, T, m, N), plan.gemm_dtype, dev)
            if code_dtype == torch.float32:
                torch.matmul(xs, ws.expand(b, T, n, N), out=d)  # (b, T, m, N): exact integer tile products
            elif code_dtype == plan.gemm_dtype:
                torch.matmul(xs.to(code_dtype), ws.to(code_dtype), out=d)
            else:  # CUDA: exact float64 products, integers of at most 2**24 (exact in float32)
                d.copy_(torch.matmul(xs.to(code_dtype), ws.to(code_dtype)))
        yc = y[b0:b1, m0:m1]
        if compiled:
            lsb_num, lsb_den = plan.int_ratio() if int8 else (1.0, plan.divisor)
            clipped = fused.epilogue_rows(
                fused.as_numpy(d), *_adc_args(cfg, plan, lsb_num, lsb_den, key, count), fused.as_numpy(sx),
                fused.as_numpy(sw_all), fused.as_numpy(yc), b0, M, m0, inside)
            _count(stats, clipped, d.numel())
            continue
        index = None if key is None else grid_index((b0 * T * M + m0) * N, (b, T, m, N), (T * M * N, M * N, N, 1), dev)
        d = adc_(d, cfg, plan, generator=generator, noise=None if noise is None else noise[b0:b1, :, m0:m1],
                 key=key, index=index, stats=stats, mask_out=None if mask is None else mask[b0:b1, :, m0:m1],
                 in_lsb=int8)
        d.mul_(sx.permute(0, 2, 1).unsqueeze(-1))  # (b, T, m, 1)
        sw = sw_all if sw_all.shape[0] == 1 else sw_all[b0:b1]
        d.mul_(sw.unsqueeze(-2))
        if cfg.bf16_tile_outputs:
            d = d.to(torch.bfloat16).to(torch.float32)
        sum_tiles(d, 1, yc)
    return y, mask


#: The compiled kernels' ``inside`` argument when no mask is wanted (an empty array: one signature).
_NO_MASK = np.ones(0, np.uint8)


def _encode_rows_compiled(xc: Tensor, n: int, T: int, cfg: ABFPConfig, static: Tensor | None,
                          int8: bool) -> tuple[Tensor, Tensor]:
    """:func:`.blocks.encode_rows` by the compiled kernels: codes (b, m, T, n), int8 when
    ``int8`` (else float32), and scales (b, m, T); the same values."""
    b, m, K = xc.shape
    x2 = xc.reshape(b * m, K)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = scratch("rows_input", x2.shape, torch.float32, xc.device).copy_(x2)
    xn = fused.as_numpy(x2)
    if static is None:
        mx = scratch("rows_block_max", (b * m, T), torch.float32, xc.device)
        fused.rows_block_max(xn, n, fused.as_numpy(mx))
        s = round_scale(mx, cfg.scale_dtype)
    else:
        s = static.expand(b * m, T).contiguous()
    codes = scratch("codes_i8" if int8 else "codes", (b * m, T * n), torch.int8 if int8 else torch.float32, xc.device)
    clamp = needs_clamp(static is None, cfg.input_max_code) or has_subnormal(s)
    fused.rows_codes(xn, n, fused.as_numpy(s), np.float32(cfg.input_max_code), clamp, fused.as_numpy(codes))
    return codes.view(b, m, T, n), s.view(b, m, T)


def plan_chunks(items: int, rows_per_item: int, max_rows: int) -> list[tuple[int, int, int, int]]:
    """The one chunk planner: ``(i0, i1, r0, r1)`` pieces covering ``items`` (batch items,
    images) of ``rows_per_item`` rows each (matrix rows, output image rows), at most
    ``max(1, max_rows)`` rows per piece: whole items ``max_rows // rows_per_item`` at a time
    when one fits, else one item cut into runs of ``max_rows`` rows. Chunking bounds memory
    only; the numbers do not depend on it."""
    rows = max(1, max_rows)
    if rows >= rows_per_item:
        step = max(1, rows // max(1, rows_per_item))
        return [(i, min(items, i + step), 0, rows_per_item) for i in range(0, items, step)]
    return [(i, i + 1, r, min(rows_per_item, r + rows)) for i in range(items) for r in range(0, rows_per_item, rows)]


def draw_key(cfg: ABFPConfig, generator: torch.Generator | None) -> int | None:
    """The counter-noise key of one product (uniform noise only; ``None`` without noise)."""
    return noise_key(generator) if cfg.noise_std > 0 and cfg.noise_dist == "uniform" else None


def use_fused(cfg: ABFPConfig, plan: AdcPlan, device: torch.device, *, wide: bool = False) -> bool:
    """Whether the compiled epilogue (:mod:`.fused`) can take this product: CPU, numba
    present, narrow float32 ADC arithmetic, uniform or no noise, no bfloat16 tile outputs.
    ``wide``: the caller's kernels also take wide plans (float64 ADC arithmetic and float64
    tile products: the convolution's, :func:`abfp.numerics.conv.conv2d_fused`)."""
    return (fused.usable() and device.type == "cpu" and cfg.kernel != "reference"
            and (wide or (not plan.wide and plan.gemm_dtype == torch.float32)) and not cfg.bf16_tile_outputs
            and (cfg.noise_std == 0 or cfg.noise_dist == "uniform"))


def _adc_args(cfg: ABFPConfig, plan: AdcPlan, lsb_num: float, lsb_den: float, key: int | None, count: bool) -> tuple:
    """``lsb_num, lsb_den, noise_step, ly, key, noisy, count`` for the compiled epilogues: a tile product ``D``
    is ``D * lsb_num / lsb_den`` output LSBs (:meth:`AdcPlan.int_ratio`), ``noise_step`` = ``w / 2**16``, the
    value in output LSBs of one noise integer (:func:`.counter_noise.noise_scale`), ``ly`` = ``L(b_y)``."""
    f32 = np.float32
    ft = np.float64 if plan.wide else f32  # a wide plan's ADC arithmetic runs in float64
    return (ft(lsb_num), ft(lsb_den), f32(noise_scale(effective_noise_std(cfg)) if key is not None else 0.0), ft(plan.max_code),
            np.uint64(key or 0), key is not None, count)


def _count(stats: ProductStats | None, clipped: int, samples: int) -> None:
    if stats is not None:
        stats.saturated += int(clipped)
        stats.conversions += samples


def sum_tiles(d: Tensor, dim: int, out: Tensor) -> Tensor:
    """``out = d[0] + d[1] + ...`` along ``dim``, in float32 and in this order (the order the
    compiled epilogues sum in; ``torch.sum`` may pair terms differently)."""
    out.copy_(d.select(dim, 0))
    for t in range(1, d.shape[dim]):
        out.add_(d.select(dim, t))
    return out


def _int_mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``torch._int_mm`` (int8 x int8 -> exact int32) with operands a BLAS reads correctly:
    torch lets a size-1 dimension carry any stride, but the GEMM takes the row stride as its
    leading dimension, so such operands get canonical strides first (no copy when contiguous)."""
    if out is None:
        return torch._int_mm(_canonical(a), _canonical(b))
    return torch._int_mm(_canonical(a), _canonical(b), out=out)


def _canonical(t: Tensor) -> Tensor:
    if t.shape[0] != 1 and t.shape[1] != 1:
        return t
    t = t.contiguous()
    return t.as_strided(t.shape, (t.shape[1], 1))


def _lsb_dtype(plan: AdcPlan) -> torch.dtype:
    return torch.float64 if plan.wide else torch.float32


def _int8_tile_products(codes: Tensor, wi8: Tensor, b0: int, plan: AdcPlan, raw: bool = False) -> Tensor:
    """Tile products of input codes (b, m, T, n) (float32 or int8) and int8 weight codes (Bw, T, n, N), in
    LSBs (``raw``: the int32 products themselves): one ``torch._int_mm`` per (batch, tile),
    each read through a strided view."""
    b, m, T, _ = codes.shape
    N = wi8.shape[-1]
    ci = codes if codes.dtype == torch.int8 else scratch("codes_i8", codes.shape, torch.int8, codes.device).copy_(codes)
    d = scratch("tiles_i32" if raw else "tiles", (b, T, m, N), torch.int32 if raw else _lsb_dtype(plan), codes.device)
    res = None if raw else scratch("int_mm", (m, N), torch.int32, codes.device)
    for i in range(b):
        wb = wi8[0] if wi8.shape[0] == 1 else wi8[b0 + i]
        for t in range(T):
            if raw:
                _int_mm(ci[i, :, t], wb[t], out=d[i, t])
            else:
                plan.int_to_lsb(_int_mm(ci[i, :, t], wb[t], out=res), d[i, t])
    return d


def analog_gemm_cols(
    cols: Tensor,
    w: Encoded,
    cfg: ABFPConfig,
    plan: AdcPlan,
    *,
    input_scale: Tensor | None = None,
    generator: torch.Generator | None = None,
    key: int | None = None,
    p_off: int = 0,
    p_total: int | None = None,
    stats: ProductStats | None = None,
    inside: Tensor | None = None,
) -> Tensor:
    """The same product with the reduction axis before the rows: the convolution layout.

    ``cols`` (G, K, P): G groups, reduction K (``unfold`` order), P output positions (images
    times pixels); a private buffer, overwritten by its codes. ``w`` as from
    :func:`abfp.numerics.encode_weights` with G weight batches: codes (G, T, n, Ng).
    Returns ``Y`` (G, Ng, P) float32. Block maxima run along K, for all full-width tiles in
    one reduction (vectorised along P); a last tile shorter than ``n`` is computed on its
    own rows rather than padded. The tile products are one batched GEMM
    ``(tiles, Ng, n) @ (tiles, n, P)`` per group, or with int8 (when :func:`use_int8` says
    so) one ``(Ng, n) @ (n, P)`` per tile, so the patches are never transposed. Numerically identical to
    :func:`analog_gemm` (the same tile products, ADC and float32 tile sum). Uniform noise:
    ``key`` with index ``((g T + t) p_total + p_off + p) Ng + o`` (this chunk's positions are
    ``p_off ...`` of ``p_total`` in the whole convolution: the index of the row-major product).
    ``inside``: the whole convolution's straight-through mask (G, T, p_total, Ng) bool, whose
    positions ``p_off ...`` receive this chunk's (True: not clipped).
    """
    G, K, P = cols.shape
    wc = w.codes
    T, n, Ng = wc.shape[1], wc.shape[2], wc.shape[3]
    if P == 0 or Ng == 0 or G == 0:
        return torch.zeros(G, Ng, P, dtype=torch.float32, device=cols.device)
    int8 = use_int8(w, plan, P)
    code_dtype = _lsb_dtype(plan) if int8 else plan.gemm_dtype
    mm = code_dtype if int8 else code_gemm_dtype(plan, cols.device, cfg.weight_max_code, cfg.input_max_code)
    d = scratch("tiles", (T, G, Ng, P), code_dtype, cols.device)
    sx = scratch("input_scales", (T, G, 1, P), torch.float32, cols.device)
    full = K // n  # tiles of the full width n (n <= K), encoded and multiplied at once
    spans = ([(0, full, n)] if full else []) + ([(full, T, K - full * n)] if full < T else [])
    for t0, t1, r in spans:
        blk = cols[:, t0 * n : t0 * n + (t1 - t0) * r].view(G, t1 - t0, r, P)
        if input_scale is None:
            s = round_scale(torch.maximum(blk.amax(2, keepdim=True), blk.amin(2, keepdim=True).neg_()), cfg.scale_dtype)
        else:
            s = input_scale.expand(G, t1 - t0, 1, P)
        sx[t0:t1] = s.transpose(0, 1)
        codes_(blk, s, cfg.input_max_code, own_max=input_scale is None)
        if int8:
            assert w.codes_i8 is not None
            bi8 = scratch("codes_i8", blk.shape, torch.int8, cols.device).copy_(blk)
            wt8 = w.codes_i8[:, t0:t1, :r].transpose(-1, -2).contiguous()  # (G, tiles, Ng, r)
            res = scratch("int_mm", (Ng, P), torch.int32, cols.device)
            for t in range(t1 - t0):
                for g in range(G):
                    plan.int_to_lsb(_int_mm(wt8[g, t], bi8[g, t], out=res), d[t0 + t, g])
        else:
            lhs = wc[:, t0:t1, :r].transpose(-1, -2)  # (G, tiles, Ng, r): the weight codes of these tiles
            out = d[t0:t1].transpose(0, 1)  # (G, tiles, Ng, P); contiguous when G == 1
            if mm == torch.float32:
                torch.matmul(lhs, blk, out=out) if out.is_contiguous() else out.copy_(torch.matmul(lhs, blk))
            else:  # float64 products (a wide plan, or CUDA: see code_gemm_dtype), exact in d's dtype
                out.copy_(torch.matmul(lhs.to(mm), blk.to(mm)))
    pt = P if p_total is None else p_total
    index = None if key is None else grid_index(p_off * Ng, (T, G, Ng, P), (pt * Ng, T * pt * Ng, 1, Ng), cols.device)
    mask_out = None if inside is None else inside.permute(1, 0, 3, 2)[..., p_off : p_off + P]  # (T, G, Ng, P) view
    d = adc_(d, cfg, plan, generator=generator, key=key, index=index, stats=stats, in_lsb=int8, mask_out=mask_out)
    d.mul_(sx).mul_(w.scales.permute(1, 0, 2).unsqueeze(-1))  # (T, G, Ng, 1)
    if cfg.bf16_tile_outputs:
        d = d.to(torch.bfloat16).to(torch.float32)
    return sum_tiles(d, 0, torch.empty(G, Ng, P, dtype=torch.float32, device=cols.device))
