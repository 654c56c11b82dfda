"""Inference convolution through the compiled kernels (:mod:`.fused`): the patches are
encoded straight from the padded input, never built in float32.

Layout. A stride-``s`` convolution reads, for kernel offset ``(i, j)``, the padded input at
``(h s + i d, w s + j d)``. Split the padded input into ``s_h s_w`` *phase images*,
``xs[c, phase (a, b)][y, x] = xpad[c, y s_h + a, x s_w + b]``; then offset ``(i, j)`` reads
phase ``(i d_h mod s_h, j d_w mod s_w)`` at ``(h + i d_h // s_h, w + j d_w // s_w)``: stride 1.
Each phase image is stored with rows of ``row_width >= wo`` columns, so for every reduction index
``k`` the patch values over *virtual* positions ``v = h row_width + w`` are one contiguous run
``xs[src(k)][off(k) + v]``; the ``row_width - wo`` extra columns of each row are computed and
dropped (the epilogue writes only the real ones). This is what lets the kernels run on
contiguous memory at full vector width.

Numerically identical to the torch column path (:func:`abfp.numerics.kernels.analog_gemm_cols`):
same block maxima, scales, codes, exact integer tile products, ADC and tile sum
(``tests/numerics/test_fused.py``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from ..config import ABFPConfig
from . import fused, kernels, vnni8
from .adc import AdcPlan
from .blocks import Encoded, has_subnormal, needs_clamp, round_scale
from .kernels import CHUNK_ELEMENTS, ProductStats, _adc_args, _count, _int_mm, int8_tiles, plan_chunks
from .workspace import scratch

#: int8 patch codes per chunk (bytes): a few images at a time stay in the caches.
PATCH_BYTES = 1 << 21
#: Phase-image values per chunk of a convolution through :func:`fused.grouped_direct` (which
#: holds nothing else): whole images, at least one.
PHASE_ELEMENTS = 1 << 20
#: int8 GEMMs are one call per group and tile: grouped convolutions with more groups than
#: this (depthwise ones) take one batched float32 GEMM instead.
INT8_MAX_GROUPS = 4
#: Grouped convolutions with at most this many output channels per group run through
#: :func:`fused.grouped_direct` (:func:`use_direct`); ``DIRECT_GROUPED = False`` (tests) keeps
#: them on the patch codes, GEMM and epilogue of the other convolutions.
DIRECT_MAX_OUTPUTS = 8
DIRECT_GROUPED = True
#: Tiles of width 8 with output channels per group a multiple of 4 run through
#: :func:`.fused.narrow_cols8` (tile products, ADC and tile sum in one kernel); ``False``: the
#: batched GEMM plus :func:`.fused.epilogue_cols4`, its reference (same numbers, tested).
NARROW8 = True
#: Where :data:`NARROW8` applies, the CPU has AVX-512 VNNI (:data:`.vnni8.USABLE`), the DACs fit in
#: int8 and :meth:`AdcPlan.int_ratio`'s multiplier is 1: :func:`.vnni8.narrow_cols8_vnni` (int8
#: dot products) in place of :func:`.fused.narrow_cols8` (float32 ones); ``False``: the latter,
#: its reference (same numbers, tested).
VNNI8 = True
#: The kernels' ``inside`` argument when no mask is wanted (an empty array: one compiled signature).
_NO_MASK = np.ones(0, np.uint8)
#: Wide plans whose tile products need float64 (``n L(b_x) L(b_w) > 2**24``: 9-12-bit DACs at
#: n = 128) split every code into two int8 halves, ``q = 32 h + l`` with ``l`` in ``[-16, 15]``,
#: and run a tile product as four int8 GEMMs with exact int32 sums
#: (``D = 1024 hw.hx + 32 (hw.lx + lw.hx) + lw.lx``, :func:`split8_tiles`) instead of one float64
#: GEMM: the same integers, so the same numbers bit for bit. Only where it gains (measured on this
#: project's CPU, one thread: four int8 GEMMs cost about one float32 GEMM, half a float64 one, and
#: splitting the patch codes costs a pass over them): at least :data:`SPLIT8_MIN_ROWS` reduction
#: rows and :data:`SPLIT8_MIN_OUTPUTS` output channels per group (EfficientNet-Lite0's wider
#: pointwise convolutions; K = 16-24 or 24 outputs lose). ``SPLIT8 = False``: the float64 GEMM.
SPLIT8 = True
SPLIT8_MIN_ROWS = 64
SPLIT8_MIN_OUTPUTS = 64
#: ``q = 32 h + l``: the low half's range, ``[-SPLIT8_BASE / 2, SPLIT8_BASE / 2)``.
SPLIT8_BASE = 32


@functools.lru_cache(maxsize=256)
def _tables(cin: int, kh: int, kw: int, stride_h: int, stride_w: int, dh: int, dw: int,
            row_width: int) -> tuple[np.ndarray, np.ndarray]:
    """For each reduction index ``k`` (groups, then ``unfold`` order ``(c, i, j)``): the phase
    image it reads (``c * phases + phase``) and its offset in virtual positions."""
    c, i, j = np.meshgrid(np.arange(cin), np.arange(kh), np.arange(kw), indexing="ij")
    src = c * (stride_h * stride_w) + ((i * dh) % stride_h) * stride_w + (j * dw) % stride_w
    off = ((i * dh) // stride_h) * row_width + (j * dw) // stride_w
    return src.reshape(-1).astype(np.int64), off.reshape(-1).astype(np.int64)


@functools.lru_cache(maxsize=256)
def _output_index(out_rows: int, row_width: int, wo: int, scale: int, slack: int = 0) -> np.ndarray:
    """For each virtual position ``h row_width + w`` of ``out_rows`` output rows: its output
    index ``(h wo + w) scale`` if ``w < wo``, else -1 (an extra column, dropped); then ``slack``
    more -1 (positions past the last row)."""
    w = np.arange(row_width)
    r = (np.arange(out_rows)[:, None] * wo + w[None, :]) * scale
    return np.concatenate([np.where(w[None, :] < wo, r, -1).reshape(-1), np.full(slack, -1)]).astype(np.int64)


def _fill_phases(xs: Tensor, src: Tensor, pads: tuple[int, int, int, int], stride: tuple[int, int]) -> None:
    """Copy images ``src`` (C, b, H, W) into their phase images ``xs``
    (C * phases, b, phase_rows, row_width), whose padding (and anything outside the input) is already zero."""
    pl, _, pt, _ = pads
    stride_h, stride_w = stride
    c, b, h, w = src.shape
    xv = xs.view(c, stride_h * stride_w, *xs.shape[1:])
    for a in range(stride_h):
        y0 = -(-(pt - a) // stride_h)  # first phase row whose padded row a + y stride_h is an input row
        ry = y0 * stride_h + a - pt
        rows = len(range(ry, h, stride_h))
        for bb in range(stride_w):
            x0 = -(-(pl - bb) // stride_w)
            rx = x0 * stride_w + bb - pl
            cols = len(range(rx, w, stride_w))
            if rows > 0 and cols > 0:
                xv[:, a * stride_w + bb, :b, y0 : y0 + rows, x0 : x0 + cols].copy_(src[:, :, ry::stride_h, rx::stride_w])


def use_direct(cfg: ABFPConfig, weights: Encoded, groups: int, int8: bool) -> bool:
    """Whether a convolution runs through :func:`fused.grouped_direct` (one pass per group and
    image: no patch codes, no tile products in memory) rather than :func:`fused.patch_encode`, a
    batched GEMM per group and :func:`fused.epilogue_cols`: grouped (depthwise) convolutions with
    at most :data:`DIRECT_MAX_OUTPUTS` output channels per group, not on int8 GEMMs, with
    bfloat16 or float32 block scales (``pow2`` scales are rounded by torch), where
    :data:`DIRECT_GROUPED` allows it. The same numbers either way."""
    return (DIRECT_GROUPED and groups > 1 and weights.codes.shape[3] <= DIRECT_MAX_OUTPUTS and not int8
            and cfg.scale_dtype in ("bfloat16", "float32"))


def use_split8(cfg: ABFPConfig, plan: AdcPlan, weights: Encoded, groups: int, kg: int, int8: bool,
               direct: bool) -> bool:
    """Whether a convolution's tile products run as four int8 GEMMs on split codes
    (:data:`SPLIT8`): a wide plan with float64 tile products, few groups (one int8 GEMM call per
    group and tile), not already int8 or direct, the int8 GEMM fast here, the halves within int8
    and every partial sum within int32 (``n (32 h_x + 16) (32 h_w + 16) < 2**31``), and a
    reduction and output width where it gains."""
    n, ng = weights.codes.shape[2], weights.codes.shape[3]
    hx, hw = _split_high(cfg.input_max_code), _split_high(cfg.weight_max_code)
    b = SPLIT8_BASE
    return (SPLIT8 and kernels.INT8_GEMM and plan.wide and plan.gemm_dtype == torch.float64 and not int8 and not direct
            and cfg.kernel == "auto" and groups <= INT8_MAX_GROUPS and max(hx, hw) <= 127
            and n * (b * hx + b // 2) * (b * hw + b // 2) < 2**31
            and kg >= SPLIT8_MIN_ROWS and ng >= SPLIT8_MIN_OUTPUTS)


def _split_high(max_code: int) -> int:
    """The largest ``|h|`` of ``q = 32 h + l`` over codes ``|q| <= max_code``."""
    return (max_code + SPLIT8_BASE // 2) // SPLIT8_BASE


def split8_(q: Tensor, high: Tensor, low: Tensor) -> None:
    """Integer codes ``q`` (float32) -> ``high``, ``low`` (int8) with ``q = 32 high + low``,
    ``low`` in ``[-16, 15]``: ``high = floor((q + 16) / 32)`` (exact: a power-of-two scaling of
    integers far below 2**24)."""
    h = scratch("split8_h", q.shape, torch.float32, q.device)
    torch.add(q, SPLIT8_BASE // 2, out=h).mul_(1.0 / SPLIT8_BASE).floor_()
    high.copy_(h)
    low.copy_(torch.sub(q, h.mul_(SPLIT8_BASE), out=h))


def split8_weights(weights: Encoded, spans: list[tuple[int, int]]) -> list[list[tuple[Tensor, Tensor]]]:
    """Per group and tile: the weight codes' halves as left operands, ``(Ng, r)`` int8 each."""
    wc = weights.codes  # (G, T, n, Ng): integers (a wide plan folds nothing into them)
    out = []
    for g in range(wc.shape[0]):
        row = []
        for t, r in spans:
            q = wc[g, t, :r].t().contiguous()
            hi, lo = torch.empty_like(q, dtype=torch.int8), torch.empty_like(q, dtype=torch.int8)
            split8_(q, hi, lo)
            row.append((hi, lo))
        out.append(row)
    return out


def split8_tiles(codes: Tensor, w8: list[list[tuple[Tensor, Tensor]]], spans: list[tuple[int, int]], n: int,
                 d: Tensor) -> None:
    """Exact integer tile products ``d`` (G, T, Ng, P) int32 of patch codes ``codes`` (G, kg, P)
    (float32 integers) and the split weight codes :func:`split8_weights`, by four int8 GEMMs per
    group and tile: ``D = ((hw.hx 32 + hw.lx + lw.hx) 32 + lw.lx)``, every partial sum exact
    in int32 (:func:`use_split8` bounds them)."""
    G, kg, P = codes.shape
    high = scratch("split8_high", (G, kg, P), torch.int8, codes.device)
    low = scratch("split8_low", (G, kg, P), torch.int8, codes.device)
    split8_(codes, high, low)
    tmp = scratch("split8_tmp", (d.shape[2], P), torch.int32, codes.device)
    for g in range(G):
        for t, r in spans:
            wh, wl = w8[g][t]
            xh, xl = high[g, t * n : t * n + r], low[g, t * n : t * n + r]
            out = d[g, t]
            _int_mm(wh, xh, out=out)
            out.mul_(SPLIT8_BASE).add_(_int_mm(wh, xl, out=tmp)).add_(_int_mm(wl, xh, out=tmp))
            out.mul_(SPLIT8_BASE).add_(_int_mm(wl, xl, out=tmp))


def _matmul_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out = a @ b`` (batched), written in place when ``out`` is contiguous."""
    if out.is_contiguous():
        torch.matmul(a, b, out=out)
    else:
        out.copy_(torch.matmul(a, b))


def conv2d_fused(x: Tensor, pads: tuple[int, int, int, int], weights: Encoded, cfg: ABFPConfig, plan: AdcPlan,
                 groups: int, k: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                 out_hw: tuple[int, int], static: Tensor | None, key: int | None, stats: ProductStats | None,
                 channels_last: bool, inside: Tensor | None = None) -> Tensor:
    """``F.conv2d`` on the device (no bias), from ``x`` (B, C, H, W); see the module text.
    ``static``: the fixed-mode input scale (0-d); ``key``: the uniform-noise key. ``inside``:
    a bool tensor of the row-major product's ADC samples (G, T, B Ho Wo, Ng), all True, that
    the kernels set False where a sample clipped (the straight-through mask; needs ``stats``)."""
    bt, c, h, w_ = x.shape
    (kh, kw), (stride_h, stride_w), (dh, dw), (ho, wo) = k, stride, dilation, out_hw
    pl, pr, pt, pb = pads
    G = groups
    kg = (c // G) * kh * kw
    T, n, Ng = weights.codes.shape[1], weights.codes.shape[2], weights.codes.shape[3]
    cout = G * Ng
    row_width = -(-(w_ + pl + pr) // stride_w)
    phase_rows = max(-(-(h + pt + pb) // stride_h), ho + ((kh - 1) * dh) // stride_h + 1)
    k_src, k_off = _tables(c, kh, kw, stride_h, stride_w, dh, dw, row_width)
    y = torch.empty(bt, cout, ho, wo, dtype=torch.float32,
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # int8 GEMMs (exact int32) one per group and tile; else float32 codes, batched over groups and tiles
    int8 = int8_tiles(plan, weights) and G <= INT8_MAX_GROUPS
    full = kg // n  # tiles of the full width n; a last tile of kg - full * n rows is computed on its own
    spans = [(t, min(n, kg - t * n)) for t in range(T)]
    if int8:
        assert weights.codes_i8 is not None
        lhs8 = [[weights.codes_i8[g, t, :r].t().contiguous() for t, r in spans] for g in range(G)]
    direct = use_direct(cfg, weights, G, int8)
    # wide float64 tile products as four int8 GEMMs on split codes: float32 patch codes, int32 products
    split = use_split8(cfg, plan, weights, G, kg, int8, direct)
    if split:
        w8 = split8_weights(weights, spans)
    wt = weights.codes.transpose(-1, -2)  # (G, T, Ng, n): the float32 codes (times the multiplier) as left operands
    if plan.wide:  # D * G L(b_y) / (n L(b_x) L(b_w)) in float64 (AdcPlan form C), as the torch path
        assert plan.code_multiplier == 1.0  # form C folds nothing into the weight codes
        int_mult, int_div = plan.numerator, plan.divisor
        if plan.gemm_dtype == torch.float64 and not split:  # tile products beyond 2**24: exact float64 codes and GEMM
            wt = wt.to(torch.float64)
    else:
        int_mult, int_div = plan.int_ratio() if int8 else (1.0, plan.divisor)
    code_dtype = torch.int8 if int8 else torch.float32 if split else plan.gemm_dtype
    assert inside is None or stats is not None  # the kernels mark only where they count
    adc_args = _adc_args(cfg, plan, int_mult, int_div, key, stats is not None)
    inside_np = fused.as_numpy(inside.view(-1).view(torch.uint8)) if inside is not None else _NO_MASK
    clamp = needs_clamp(static is None, cfg.input_max_code)
    lx = np.float32(cfg.input_max_code)
    # tiles of width 8: tile products, ADC and tile sum in one kernel (no partial sums in memory)
    narrow = (n == 8 and Ng % 4 == 0 and not int8 and not plan.wide and plan.gemm_dtype == torch.float32 and NARROW8
              and not direct)
    vnni = (narrow and VNNI8 and vnni8.USABLE and weights.codes_i8 is not None and plan.int8
            and plan.int_ratio()[0] == 1.0 and inside is None)  # (it marks no clamp mask)
    if vnni:  # int8 patch codes, the integer tile products divided by int_ratio's divisor
        code_dtype = torch.int8
        adc_args = _adc_args(cfg, plan, 1.0, plan.int_ratio()[1], key, stats is not None)
        wv_np, corr_np = vnni8.pack_weights(weights.codes_i8)
    kc = T * n if narrow else kg  # code rows per group: the narrow kernel reads whole tiles (zero past kg)
    assert not narrow or int_mult == 1.0  # narrow_cols8 divides by lsb_den alone
    if direct:  # nothing but the phase images in memory: whole images, about PHASE_ELEMENTS values of them
        rows = max(1, PHASE_ELEMENTS // (c * stride_h * stride_w * phase_rows * row_width)) * ho
    else:  # images (or output rows of one image) per chunk: bounded by the codes and the partial sums
        per_row = row_width * (G * kc * 4 if narrow else max(G * kg, T * cout * 4))
        rows = max(1, min(PATCH_BYTES, CHUNK_ELEMENTS * 4) // per_row)
    chunks = plan_chunks(bt, ho, rows)
    nb = max(1, min(bt, rows // ho)) if rows >= ho else 1
    src = (x.to(torch.bfloat16) if cfg.bf16_io else x).transpose(0, 1)  # (C, B, H, W) view
    image_len = phase_rows * row_width
    n_phase = c * stride_h * stride_w * nb * image_len
    # the phase images, zeroed, with slack after them for the direct kernel's whole vectors
    xs_flat = scratch("phases", (n_phase + fused.DIRECT_LANES,), torch.float32, x.device).zero_()
    xs = xs_flat[:n_phase].view(c * stride_h * stride_w, nb, phase_rows, row_width)
    xs_np = fused.as_numpy(xs.view(c * stride_h * stride_w, nb, image_len))
    weight_scales_np = fused.as_numpy(weights.scales)
    if direct:  # the weight codes as the GEMM would multiply them (float32, or float64 for a wide GEMM)
        wc_np = fused.as_numpy(weights.codes.to(plan.gemm_dtype).contiguous())
        static_np = np.float32(-1.0 if static is None else static.item())
    elif narrow:
        wc_np = fused.as_numpy(weights.codes)
    fused.set_threads()
    clipped = 0
    for b0, b1, h0, h1 in chunks:
        b, out_rows = b1 - b0, h1 - h0
        if h0 == 0:
            _fill_phases(xs, src[:, b0:b1], pads, stride)
        L = out_rows * row_width
        offs = k_off + h0 * row_width
        if direct:
            clipped += fused.grouped_direct(fused.as_numpy(xs_flat), nb * image_len, image_len, k_src, offs, kg, n,
                                            cfg.scale_dtype == "bfloat16", static_np, lx, wc_np, weight_scales_np,
                                            *adc_args, fused.as_numpy(y[b0:b1, :, h0:h1]), row_width,
                                            _output_index(out_rows, row_width, wo, Ng, fused.DIRECT_LANES),
                                            bt * ho * wo, (b0 * ho + h0) * wo, fused.DIRECT_ELEMENTS, inside_np)
            continue
        # (the VNNI kernel reads up to 15 positions past the last row of the codes and scales)
        slack = 16 if vnni else 0
        n_codes = G * kc * b * L
        codes = scratch("patch_codes", (n_codes + slack,), code_dtype, x.device)[:n_codes].view(G, kc, b * L)
        if kc > kg:
            codes[:, kg:].zero_()
        s_buf = scratch("input_scales", (T * G * b * L + slack,), torch.float32, x.device)[: T * G * b * L]
        if static is None:
            s = s_buf.view(T, G, b, L)
            fused.patch_encode(xs_np, k_src, offs, kg, n, cfg.scale_dtype == "bfloat16", lx, clamp,
                               fused.as_numpy(s), fused.as_numpy(codes))
            if cfg.scale_dtype == "pow2":  # rounded as torch rounds it, and the codes again
                s = round_scale(s, "pow2")
                clamp = clamp or has_subnormal(s)  # a saturated scale (2^127) may be half its block's max
        else:
            s = static.expand(T, G, b, L).contiguous()
        if static is not None or cfg.scale_dtype == "pow2":
            fused.patch_codes(xs_np, k_src, offs, kg, n, fused.as_numpy(s), lx, clamp, fused.as_numpy(codes))
        if vnni:
            if s.data_ptr() != s_buf.data_ptr():  # the scales where the slack follows them
                s = s_buf.view(T, G, b, L).copy_(s)
            clipped += vnni8.narrow_cols8_vnni(fused.as_numpy(codes), wv_np, corr_np, *adc_args[1:],
                                               fused.as_numpy(s.view(T, G, b * L)), weight_scales_np,
                                               fused.as_numpy(y[b0:b1, :, h0:h1]), row_width,
                                               _output_index(out_rows, row_width, wo, Ng), bt * ho * wo,
                                               (b0 * ho + h0) * wo, fused.NARROW_STRIPE)
            continue
        if narrow:
            clipped += fused.narrow_cols8(fused.as_numpy(codes), wc_np, *adc_args, fused.as_numpy(s.view(T, G, b * L)),
                                          weight_scales_np, fused.as_numpy(y[b0:b1, :, h0:h1]), row_width,
                                          _output_index(out_rows, row_width, wo, Ng), bt * ho * wo,
                                          (b0 * ho + h0) * wo, fused.NARROW_STRIPE, inside_np)
            continue
        d = scratch("patch_tiles", (G, T, Ng, b * L), torch.int32 if int8 or split else plan.gemm_dtype, x.device)
        if int8:
            for g in range(G):
                for t, r in spans:
                    _int_mm(lhs8[g][t], codes[g, t * n : t * n + r], out=d[g, t])
        elif split:  # int32 products: the wide epilogue takes them as float64 integers, exact
            split8_tiles(codes, w8, spans, n, d)
        else:
            if full:
                _matmul_into(d[:, :full], wt[:, :full], codes[:, : full * n].view(G, full, n, b * L))
            if full < T:
                _matmul_into(d[:, full], wt[:, full, :, : kg - full * n], codes[:, full * n :])
        epilogue = fused.epilogue_cols4 if Ng % 4 == 0 and not plan.wide else fused.epilogue_cols
        clipped += epilogue(fused.as_numpy(d), *adc_args, fused.as_numpy(s.view(T, G, b * L)),
                                       weight_scales_np, fused.as_numpy(y[b0:b1, :, h0:h1]), row_width,
                                       _output_index(out_rows, row_width, wo, Ng), bt * ho * wo,
                                       (b0 * ho + h0) * wo, inside_np)
    _count(stats, clipped, T * cout * bt * ho * wo)
    if cfg.bf16_io:
        y = y.to(torch.bfloat16).to(torch.float32)
    return y
