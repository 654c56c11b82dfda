"""SPEC.md section 1, line by line, in float64: the oracle the fast paths are tested against.

Deliberately independent of the fast path's helpers: it shares no code with
``blocks.py``, ``adc.py`` or ``kernels.py``. Slow and memory-hungry (it holds the whole
``(B, M, N, T)`` tensor of tile outputs); use it for tests and small problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ABFPConfig, max_code


@dataclass
class ReferenceResult:
    """Everything the reference computes, for tests to inspect."""

    y: Tensor  # (B, M, N) float64: the layer output without bias
    qy: Tensor  # (B, M, N, T) ADC codes
    saturated: Tensor  # (B, M, N, T) bool: |a| > 1 before the clamp
    sx: Tensor  # (B, M, T) input scales as used
    sw: Tensor  # (B, N, T) weight scales as used
    tile_outputs: Tensor  # (B, M, N, T) y[m, j, t] after rescaling


def _round_scale(s: Tensor, scale_dtype: str) -> Tensor:
    if scale_dtype == "bfloat16":
        return s.to(torch.float32).to(torch.bfloat16).to(torch.float64)
    if scale_dtype == "pow2":
        pos = s > 0
        e = torch.ceil(torch.log2(torch.where(pos, s, torch.ones_like(s))))
        return torch.where(pos, torch.exp2(e), torch.zeros_like(s))
    return s.to(torch.float32).to(torch.float64)


def reference_product(
    x: Tensor,
    w: Tensor,
    config: ABFPConfig,
    *,
    input_scale: float | Tensor | None = None,
    weight_scale: float | Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ReferenceResult:
    """The analog product ``X @ W^T`` of SPEC.md section 1 (steps 1-7, without bias).

    ``x``: (B, M, K) or (M, K); ``w``: (B, N, K) or (N, K). ``noise``: the device noise ``e``
    in output LSBs, shape (B, M, N, T); when ``None`` and the config is noisy it is drawn
    here from ``generator``. In ``fixed`` mode ``input_scale``/``weight_scale`` are the static
    per-tensor scales (default: each tensor's max |value|).
    """
    cfg = config
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if w.dim() == 2:
        w = w.unsqueeze(0)
    x = x.to(torch.float64)
    w = w.to(torch.float64)
    if cfg.bf16_io:
        x = x.to(torch.bfloat16).to(torch.float64)
        w = w.to(torch.bfloat16).to(torch.float64)
    B = max(x.shape[0], w.shape[0])
    x = x.expand(B, *x.shape[1:])
    w = w.expand(B, *w.shape[1:])
    M, K = x.shape[1], x.shape[2]
    N = w.shape[1]
    n = cfg.tile_width
    Lx, Lw, Ly = max_code(cfg.input_bits), max_code(cfg.weight_bits), max_code(cfg.output_bits)

    # 1. pad K to a multiple of n
    T = math.ceil(K / n)
    pad = T * n - K
    x = torch.nn.functional.pad(x, (0, pad))
    w = torch.nn.functional.pad(w, (0, pad))
    xt = x.reshape(B, M, T, n)
    wt = w.reshape(B, N, T, n)

    # 2. scales per block (abfp) or per tensor (fixed), in the configured format
    if cfg.mode == "abfp":
        sx = xt.abs().amax(-1) if T > 0 else torch.zeros(B, M, 0, dtype=torch.float64)
        sw = wt.abs().amax(-1) if T > 0 else torch.zeros(B, N, 0, dtype=torch.float64)
    else:
        xs = torch.as_tensor(input_scale if input_scale is not None else (x.abs().max() if x.numel() else 0.0), dtype=torch.float64)
        ws = torch.as_tensor(weight_scale if weight_scale is not None else (w.abs().max() if w.numel() else 0.0), dtype=torch.float64)
        sx = xs.expand(B, M, T).clone()
        sw = ws.expand(B, N, T).clone()
    sx = _round_scale(sx, cfg.scale_dtype)
    sw = _round_scale(sw, cfg.scale_dtype)

    # 3. DAC codes; a zero scale encodes as zeros
    def codes(v: Tensor, s: Tensor, L: int) -> Tensor:
        safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
        q = torch.round(torch.clamp(v / safe, -1.0, 1.0) * L)
        return torch.where((s > 0).unsqueeze(-1), q, torch.zeros_like(q))

    qx = codes(xt, sx, Lx)
    qw = codes(wt, sw, Lw)

    # 4. exact integer dot product per tile
    d = torch.einsum("bmtk,bntk->bmnt", qx, qw)

    # 5. gain, noise, ADC. a * L(b_y) = d * G * L(b_y) / (L(b_x) L(b_w) n), computed as one
    # product of integers and one division so that exact ties stay exact.
    if noise is None:
        if cfg.noise_std > 0:
            shape = (B, M, N, T)
            if cfg.noise_dist == "uniform":
                width = math.sqrt(12.0) * cfg.noise_std
                noise = (torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5) * width
            else:
                noise = torch.randn(shape, generator=generator, dtype=torch.float64) * cfg.noise_std
        else:
            noise = torch.zeros((B, M, N, T), dtype=torch.float64)
    noise = noise.to(torch.float64)
    a_times_Ly = (d * (cfg.gain * Ly)) / (Lx * Lw * n) + noise
    saturated = a_times_Ly.abs() > Ly
    qy = torch.round(torch.clamp(a_times_Ly, -Ly, Ly))

    # 6. back to numbers
    y_t = qy * (n / (cfg.gain * Ly)) * sx.unsqueeze(2) * sw.unsqueeze(1)
    if cfg.bf16_tile_outputs:
        y_t = y_t.to(torch.float32).to(torch.bfloat16).to(torch.float64)

    # 7. digital accumulation across tiles (float64 here: the ideal the float32 sum approximates)
    y = y_t.sum(-1)
    if cfg.bf16_io:
        y = y.to(torch.bfloat16).to(torch.float64)
    return ReferenceResult(y=y, qy=qy, saturated=saturated, sx=sx, sw=sw, tile_outputs=y_t)
