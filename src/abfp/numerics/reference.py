"""SPEC.md section 1, line by line, in float64: the oracle the fast paths are tested against.

Deliberately independent of the fast path's helpers: it shares no code with
``blocks.py``, ``adc.py`` or ``kernels.py``. Slow and memory-hungry (it holds the whole
``(B, M, N, T)`` tensor of tile outputs); use it for tests and small problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..config import ABFPConfig, max_code


@dataclass
class ReferenceResult:
    """Everything the reference computes, for tests to inspect."""

    y: Tensor  # (B, M, N) float64: the layer output without bias
    saturated: Tensor  # (B, M, N, T) bool: |a| > 1 before the clamp
    sx: Tensor  # (B, M, T) input scales as used
    sw: Tensor  # (B, N, T) weight scales as used
    tile_outputs: Tensor  # (B, M, N, T) y[m, j, t] after rescaling


def _round_scale(s: Tensor, scale_dtype: str) -> Tensor:
    """The scale format, in float64, saturating at its largest finite value (bfloat16
    ``(2 - 2^-7) 2^127``, pow2 ``2^127``): a block max beyond it encodes at full scale."""
    if scale_dtype == "bfloat16":
        return s.to(torch.float32).to(torch.bfloat16).to(torch.float64).clamp(max=float(torch.finfo(torch.bfloat16).max))
    if scale_dtype == "pow2":
        # 2**ceil(log2 s), exactly: float64 log2 brackets the exponent, one step corrects it
        pos = s > 0
        one = torch.ones_like(s)
        e = torch.ceil(torch.log2(torch.where(pos, s, one)))
        e = torch.where(torch.exp2(e - 1) >= s, e - 1, e)
        e = torch.where(torch.exp2(e) < s, e + 1, e)
        return torch.where(pos, torch.exp2(e.clamp(max=127)), torch.zeros_like(s)).to(torch.float32).to(torch.float64)
    return s.to(torch.float32).to(torch.float64)


_M64 = (1 << 64) - 1


def counter_noise(key: int, shape: tuple[int, ...], noise_std: float) -> Tensor:
    """The uniform device noise of :mod:`abfp.numerics.counter_noise` written out again from
    its formula (numpy uint64 arithmetic, wrapping modulo 2**64): sample ``i`` (flat index in
    ``shape``, row-major) is ``float32(k_i) * float32(sqrt(12) noise_std / 2**16)`` in float32,
    ``k_i`` the odd 16-bit lane ``i % 4`` of ``splitmix64(key + (i // 4 + 1) * golden)``.
    Returned in float64."""
    count = math.prod(shape)
    i = np.arange(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key & _M64) + ((i >> np.uint64(2)) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    lane = ((z >> ((i & np.uint64(3)) * np.uint64(16))) & np.uint64(0xFFFF)).astype(np.int64)
    k = np.where(lane >= 32768, lane - 65536, lane) | 1
    e = k.astype(np.float32) * np.float32(math.sqrt(12.0) * noise_std / 65536.0)
    return torch.from_numpy(e.astype(np.float64).reshape(shape))


def reference_product(
    x: Tensor,
    w: Tensor,
    config: ABFPConfig,
    *,
    input_scale: float | Tensor | None = None,
    weight_scale: float | Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_key: int | None = None,
    dac_float32: bool = False,
) -> ReferenceResult:
    """The analog product ``X @ W^T`` of SPEC.md section 1 (steps 1-7, without bias).

    ``x``: (B, M, K) or (M, K); ``w``: (B, N, K) or (N, K). ``noise``: the device noise ``e``
    in output LSBs, shape (B, M, N, T); when ``None`` and the config is noisy it is drawn
    here: uniform noise is the fast path's counter-based noise (:func:`counter_noise`, the
    sample of ``(b, t, m, j)`` at index ``((b T + t) M + m) N + j``) under ``noise_key``, or
    under a key drawn from ``generator`` as the fast path draws it (the same generator state
    gives the same noise); Gaussian noise is drawn from ``generator``. In ``fixed`` mode
    ``input_scale``/``weight_scale`` are the static per-tensor scales (default: each
    tensor's max |value|).

    ``dac_float32``: compute the DAC's ``v / s * L(b)`` in float32 as the fast path does (its
    decisions where the exact value lies within float32 rounding of a half-integer; SPEC
    allows these one-code differences), every other step in float64 as above.
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
        for given in (xs, ws):  # as the fast path: a scale that cannot encode is an error, not NaN or zeros
            if not bool(torch.isfinite(given.float()).all()) or bool((given < 0).any()):  # held in float32
                raise ValueError(f"a fixed-point scale must be finite in float32 and >= 0, got {given.tolist()}")
        sx = xs.expand(B, M, T).clone()
        sw = ws.expand(B, N, T).clone()
    sx = _round_scale(sx, cfg.scale_dtype)
    sw = _round_scale(sw, cfg.scale_dtype)

    # 3. DAC codes; a zero scale encodes as zeros
    def codes(v: Tensor, s: Tensor, L: int) -> Tensor:
        if dac_float32:
            v, s = v.to(torch.float32), s.to(torch.float32)
        safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
        q = torch.round(torch.clamp(v / safe, -1.0, 1.0) * L)
        return torch.where((s > 0).unsqueeze(-1), q, torch.zeros_like(q)).to(torch.float64)

    qx = codes(xt, sx, Lx)
    qw = codes(wt, sw, Lw)

    # 4. exact integer dot product per tile
    d = torch.einsum("bmtk,bntk->bmnt", qx, qw)

    # 5. gain, noise, ADC. a * L(b_y) = d * G * L(b_y) / (L(b_x) L(b_w) n), computed as one
    # product of integers and one division so that exact ties stay exact.
    if noise is None:
        if cfg.noise_std > 0:
            std = cfg.noise_std / math.sqrt(cfg.repeats)  # k repeats averaged (SPEC section 5)
            shape = (B, M, N, T)
            if cfg.noise_dist == "uniform":
                if noise_key is None:
                    noise_key = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
                noise = counter_noise(noise_key, (B, T, M, N), std).permute(0, 2, 3, 1)
            else:
                noise = torch.randn(shape, generator=generator, dtype=torch.float64) * std
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
    return ReferenceResult(y=y, saturated=saturated, sx=sx, sw=sw, tile_outputs=y_t)
