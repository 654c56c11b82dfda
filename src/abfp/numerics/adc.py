"""Gain, device noise and the output ADC (SPEC.md section 1, steps 5-6), for the fast path.

With ``d`` the integer dot product of one tile, the ADC sees, in output LSBs,

    a * L(b_y) = d * G * L(b_y) / (L(b_x) L(b_w) n) + e,     qy = round(clamp(., -L(b_y), L(b_y)))

and one output code is worth ``n / (G L(b_y)) * sx * sw``. :class:`AdcPlan` decides how to
evaluate the first line in float32 so that exact ties (``a L(b_y)`` exactly half-way
between two codes, frequent without noise) round as float64 rounds them: when ``G / n`` is
a power of two it is folded into the weight codes (exact), and when ``L(b_x) L(b_w) / L(b_y)``
is exactly representable the rest is one correctly rounded division.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ABFPConfig

_F32_EXACT_INT = 1 << 24


def _is_pow2(v: float) -> bool:
    m, _ = math.frexp(v)
    return v > 0 and m == 0.5


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


@dataclass(frozen=True)
class AdcPlan:
    """How the fast path turns integer tile products into ADC codes and numbers."""

    code_multiplier: float
    """Power of two folded into the weight codes (``G / n`` when that is a power of two)."""
    divisor: float | None
    """``r = D / divisor`` (exact-tie form), or None to use ``multiplier``."""
    multiplier: float
    """``r = D * multiplier`` when ``divisor`` is None."""
    max_code: int
    """``L(b_y)``."""
    step: float
    """``n / (G L(b_y))``: value of one output code, in units of ``sx * sw``."""
    gemm_dtype: torch.dtype
    """float32 when every tile product is an integer below 2**24 (exact), else float64."""
    exact_ties: bool

    @staticmethod
    def for_config(cfg: ABFPConfig) -> "AdcPlan":
        n, g = cfg.tile_width, cfg.gain
        lx, lw, ly = cfg.input_max_code, cfg.weight_max_code, cfg.output_max_code
        gemm_dtype = torch.float32 if n * lx * lw <= _F32_EXACT_INT else torch.float64
        alpha = g / n
        beta = lx * lw / ly
        if _is_pow2(alpha) and (lx * lw) % ly == 0 and beta < _F32_EXACT_INT:
            return AdcPlan(alpha, float(beta), 1.0, ly, n / (g * ly), gemm_dtype, True)
        if _is_pow2(alpha):
            return AdcPlan(alpha, None, _f32(ly / (lx * lw)), ly, n / (g * ly), gemm_dtype, False)
        return AdcPlan(1.0, None, _f32(g * ly / (n * lx * lw)), ly, n / (g * ly), gemm_dtype, False)

    def to_lsb_(self, d: Tensor) -> Tensor:
        """In place: integer tile products (already times ``code_multiplier``) -> ``G u L(b_y) / n``."""
        if self.divisor is not None:
            return d.div_(self.divisor)
        return d.mul_(self.multiplier)


def draw_noise(shape: tuple[int, ...], cfg: ABFPConfig, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Device noise ``e`` in output LSBs (float32): uniform of width ``sqrt(12) std`` or Gaussian."""
    if cfg.noise_dist == "uniform":
        width = math.sqrt(12.0) * cfg.noise_std
        r = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
        return r.sub_(0.5).mul_(width)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).mul_(cfg.noise_std)


def add_noise_(r: Tensor, cfg: ABFPConfig, generator: torch.Generator | None) -> Tensor:
    """In place: ``r += e`` with fresh noise of ``r``'s shape."""
    if cfg.noise_dist == "uniform":
        width = math.sqrt(12.0) * cfg.noise_std
        u = torch.rand(r.shape, generator=generator, device=r.device, dtype=r.dtype)
        return r.add_(u, alpha=width).sub_(0.5 * width)
    z = torch.randn(r.shape, generator=generator, device=r.device, dtype=r.dtype)
    return r.add_(z, alpha=cfg.noise_std)
