"""SPEC section 1 (ABFP, no noise) in float64, written out independently of the simulator: the
reference the edge-case tests (scale saturation, every family on edge inputs) check against."""

from __future__ import annotations

import torch

from abfp import ABFPConfig

BF16_MAX = float(torch.finfo(torch.bfloat16).max)


def spec64(x: torch.Tensor, w: torch.Tensor, cfg: ABFPConfig, with_code: bool = False):
    """X (M, K) @ W (N, K)^T in float64, scales saturating at the largest finite value of their
    format. ``with_code``: also the size of one ADC code of each output summed over its tiles
    (the allowance SPEC gives: float32 rounding may put a value across a rounding boundary)."""
    n = cfg.tile_width
    lx, lw, ly = (2 ** (b - 1) - 1 for b in (cfg.input_bits, cfg.weight_bits, cfg.output_bits))
    k = x.shape[-1]
    t = -(-k // n)

    def tiles(v):
        return torch.nn.functional.pad(v.double(), (0, t * n - k)).reshape(v.shape[0], t, n)

    def scale(v):
        m = v.abs().amax(-1)
        if cfg.scale_dtype == "bfloat16":
            return m.float().to(torch.bfloat16).double().clamp(max=BF16_MAX)
        if cfg.scale_dtype == "pow2":
            e = torch.ceil(torch.log2(m.clamp(min=1e-300)))
            return torch.where(m > 0, torch.exp2(e.clamp(max=127)), torch.zeros_like(m))
        return m

    def codes(v, s, lv):
        return torch.round((v / torch.where(s > 0, s, 1).unsqueeze(-1)).clamp(-1, 1) * lv)

    xt, wt = tiles(x), tiles(w)
    sx, sw = scale(xt), scale(wt)
    d = torch.einsum("mtk,ntk->mnt", codes(xt, sx, lx), codes(wt, sw, lw))
    a = cfg.gain * (d / (lx * lw)) / n
    qy = torch.round(a.clamp(-1, 1) * ly)
    unit = (n / (cfg.gain * ly)) * sx.unsqueeze(1) * sw.unsqueeze(0)  # one ADC code of each tile (M, N, T)
    y = (qy * unit).sum(-1)
    return (y, unit.sum(-1)) if with_code else y
