"""The fast path: exact GEMMs on DAC codes, the per-tile ADC as an in-place epilogue, in chunks.

For each chunk of rows, ``D = codes_x @ codes_w`` gives every tile's integer dot product at
once (a batched GEMM over the tiles, exact in float32 because the products are integers
below 2**24), then the epilogue turns it into ADC codes and numbers and sums the tiles in
float32. Chunks are sized so that the ``(T, rows, N)`` partial sums stay small (never the
whole tensor of a large layer), which also keeps them in cache.

Tested against :mod:`abfp.numerics.reference` (``tests/numerics``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ABFPConfig
from .adc import AdcPlan, add_noise_
from .blocks import Encoded, encode_rows

#: Elements of partial sums per chunk (float32): 1 Mi elements = 4 MiB.
CHUNK_ELEMENTS = 1 << 20


@dataclass
class ProductStats:
    """ADC statistics of one product: saturated (clipped) samples out of all ADC samples."""

    saturated: int = 0
    conversions: int = 0


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
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor | None]:
    """Sum over tiles of the ADC'd tile products of ``x3`` (B, M, K) with encoded weights.

    Inputs are encoded chunk by chunk (rows of M), so no full-size code tensor is ever
    built. ``w.codes``: (Bw, T, n, N) with Bw in (1, B), already times
    ``plan.code_multiplier``; ``w.scales`` (Bw, T, N) already times ``plan.step``.
    ``input_scale``: the fixed-mode static scale (0-d, in the scale format). ``noise``:
    optional explicit noise (B, T, M, N) in LSBs (tests). Returns ``Y`` (B, M, N) float32
    and, with ``want_mask``, the straight-through mask (B, T, M, N) bool (True: not clipped).
    """
    wc = w.codes
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
    ly = float(plan.max_code)
    sw_all = w.scales  # (Bw, T, N)
    # rows per chunk: bounded by the partial sums (T*N per row) and the input codes (T*n per row)
    per_row = T * max(N, n)
    per_batch = per_row * M
    if per_batch <= chunk_elements:
        step_b = max(1, chunk_elements // per_batch)
        chunks = [(b, min(B, b + step_b), 0, M) for b in range(0, B, step_b)]
    else:
        step_m = max(1, chunk_elements // per_row)
        chunks = [(b, b + 1, m, min(M, m + step_m)) for b in range(B) for m in range(0, M, step_m)]
    wide = plan.wide
    for b0, b1, m0, m1 in chunks:
        codes, sx = encode_rows(x3[b0:b1, m0:m1], n=n, max_code=cfg.input_max_code, mode=cfg.mode,
                                scale_dtype=cfg.scale_dtype, static_scale=input_scale)
        xs = codes.permute(0, 2, 1, 3)  # (b, T, m, n) view: the GEMM takes the strides as they are
        ws = wc if wc.shape[0] == 1 else wc[b0:b1]
        if plan.gemm_dtype != torch.float32:
            d = torch.matmul(xs.to(plan.gemm_dtype), ws.to(plan.gemm_dtype))
        else:
            d = torch.matmul(xs, ws)  # (b, T, m, N): exact integer tile products
        if wide:
            d = d.to(torch.float64)
        plan.to_lsb_(d)
        if noise is not None:
            d.add_(noise[b0:b1, :, m0:m1])
        elif cfg.noise_std > 0:
            add_noise_(d, cfg, generator)
        if stats is not None or mask is not None:
            inside = d.abs() <= ly
            if mask is not None:
                mask[b0:b1, :, m0:m1] = inside
            if stats is not None:
                stats.saturated += int(inside.numel() - inside.sum())
                stats.conversions += inside.numel()
        d.clamp_(-ly, ly).round_()
        if wide:
            d = d.to(torch.float32)
        d.mul_(sx.permute(0, 2, 1).unsqueeze(-1))  # (b, T, m, 1)
        sw = sw_all if sw_all.shape[0] == 1 else sw_all[b0:b1]
        d.mul_(sw.unsqueeze(-2))
        if cfg.bf16_tile_outputs:
            d = d.to(torch.bfloat16).to(torch.float32)
        torch.sum(d, dim=1, out=y[b0:b1, m0:m1]) if y[b0:b1, m0:m1].is_contiguous() else y[b0:b1, m0:m1].copy_(d.sum(1))
    return y, mask
