"""Gain, device noise and the output ADC (SPEC.md section 1, steps 5-6), for the fast path.

With ``d`` the integer dot product of one tile, the ADC sees, in output LSBs,

    a * L(b_y) = d * G * L(b_y) / (L(b_x) L(b_w) n) + e,     qy = round(clamp(., -L(b_y), L(b_y)))

and one output code is worth ``n / (G L(b_y)) * sx * sw``. :class:`AdcPlan` decides how to
evaluate the first line in float32 so that exact ties (``a L(b_y)`` exactly half-way
between two codes, frequent without noise) round as float64 rounds them: when ``G / n`` is
a power of two, ``G / n`` or ``G L(b_y) / n`` (a power of two times an integer, not in general
a power of two) is folded into the weight codes (exact), and the rest is one correctly rounded
division by ``L(b_x) L(b_w) / L(b_y)`` or ``L(b_x) L(b_w)`` (see :class:`AdcPlan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ABFPConfig
from .counter_noise import noise_values

_F32_EXACT_INT = 1 << 24
_I32_MAX = (1 << 31) - 1
#: Largest code magnitude exact in bfloat16 (8 significant bits): a float32 GEMM whose codes
#: stay below it is exact even where the GEMM rounds its inputs to TF32 or bfloat16.
_BF16_EXACT_INT = 1 << 8


def _is_pow2(v: float) -> bool:
    m, _ = math.frexp(v)
    return v > 0 and m == 0.5


@dataclass(frozen=True)
class AdcPlan:
    """How the fast path turns integer tile products into ADC codes and numbers.

    ``r = D * code_multiplier * numerator / divisor`` equals ``a L(b_y)`` (before noise); the
    forms below keep exact ties exact (one correctly rounded division of exact values):

    - A: ``G/n`` a power of two and ``L(b_y)`` divides ``L(b_x) L(b_w)``: fold ``G/n`` into the
      weight codes, divide by ``L(b_x) L(b_w) / L(b_y)`` (the default 8/8/8 lands here);
    - B: ``G/n`` a power of two and ``n L(b_x) L(b_w) L(b_y) <= 2**24``: fold ``G L(b_y)/n``
      into the weight codes, divide by ``L(b_x) L(b_w)`` (6/6/8 lands here);
    - C: otherwise, the step and the rounding run in float64 (``wide``).
    """

    code_multiplier: float
    """Folded into the weight codes (keeps them exact: a power of two times an integer)."""
    numerator: float
    """Multiplies ``D`` (only in the wide form; 1 otherwise)."""
    divisor: float
    """Divides ``D * numerator``."""
    wide: bool
    """Do the ADC step and rounding in float64."""
    max_code: int
    """``L(b_y)``."""
    step: float
    """``n / (G L(b_y))``: value of one output code, in units of ``sx * sw``."""
    gemm_dtype: torch.dtype
    """float32 when every tile product is an integer of at most 2**24 (``n L(b_x) L(b_w) <=
    2**24``: exact), else float64 (exact while ``n L(b_x) L(b_w) <= 2**53``, which
    :class:`~abfp.config.ABFPConfig` enforces). See :func:`code_gemm_dtype` for CUDA."""
    int8: bool = False
    """Both DACs' codes fit in int8 (at most 8 bits), the int32 sums cannot overflow
    (``n L(b_x) L(b_w) < 2**31``) and ``kernel="auto"``: the GEMM may run on int8 with exact
    int32 sums (``torch._int_mm``, several times faster than float32 on CPU)."""

    @staticmethod
    def for_config(cfg: ABFPConfig) -> "AdcPlan":
        n, g = cfg.tile_width, cfg.gain
        lx, lw, ly = cfg.input_max_code, cfg.weight_max_code, cfg.output_max_code
        gemm_dtype = torch.float32 if n * lx * lw <= _F32_EXACT_INT else torch.float64
        # "chunked" keeps float32 GEMMs; int32 sums of n products of two int8 codes must not wrap
        i8 = lx <= 127 and lw <= 127 and n * lx * lw <= _I32_MAX and cfg.kernel == "auto"
        alpha = g / n
        step = n / (g * ly)
        if gemm_dtype == torch.float32 and _is_pow2(alpha):
            if (lx * lw) % ly == 0:
                return AdcPlan(alpha, 1.0, float(lx * lw // ly), False, ly, step, gemm_dtype, i8)
            if n * lx * lw * ly <= _F32_EXACT_INT:
                return AdcPlan(alpha * ly, 1.0, float(lx * lw), False, ly, step, gemm_dtype, i8)
        return AdcPlan(1.0, float(g * ly), float(n * lx * lw), True, ly, step, gemm_dtype, i8)

    def int_ratio(self) -> tuple[float, float]:
        """``(multiplier, divisor)`` with ``D * multiplier / divisor`` (float32, in this order) the LSB value of an
        integer tile product ``D`` *without* ``code_multiplier``: what :meth:`int_to_lsb`
        computes (narrow forms only)."""
        assert not self.wide
        if _is_pow2(self.code_multiplier):
            return 1.0, self.divisor / self.code_multiplier
        return self.code_multiplier, self.divisor

    def int_to_lsb(self, res: Tensor, out: Tensor) -> Tensor:
        """Integer tile products ``res`` (int32, *without* ``code_multiplier``) -> ``out`` in
        LSBs, the same values :meth:`to_lsb_` gives on float products times the multiplier."""
        if not self.wide and _is_pow2(self.code_multiplier):
            # (D * 2^k) / q == D / (q / 2^k): both one correctly rounded division of exact values
            return torch.div(res, self.divisor / self.code_multiplier, out=out)
        out.copy_(res)
        if self.code_multiplier != 1.0:
            out.mul_(self.code_multiplier)
        return self.to_lsb_(out)

    def to_lsb_(self, d: Tensor) -> Tensor:
        """In place: tile products (times ``code_multiplier``) -> ``G u L(b_y) / n``."""
        if self.numerator != 1.0:
            d.mul_(self.numerator)
        return d.div_(self.divisor)


def code_gemm_dtype(plan: AdcPlan, device: torch.device, weight_max_code: int, input_max_code: int) -> torch.dtype:
    """The dtype of the GEMM on DAC codes on ``device``: ``plan.gemm_dtype``, except on CUDA.

    A float32 GEMM on CUDA may round its inputs to TF32 (10 stored mantissa bits) or
    bfloat16 (7) when a user allows it (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.set_float32_matmul_precision``); the products are still summed in float32. So a
    float32 GEMM on CUDA is exact, whatever these settings, only when every code is exact in
    bfloat16: ``L(b_x) < 2**8`` and ``L(b_w) c < 2**8`` with ``c`` the odd factor of
    ``plan.code_multiplier`` (1 when ``G/n`` is folded in alone: the default 8/8/8 keeps
    float32; 6/6/8 folds in ``L(b_y)`` and takes float64). Otherwise the codes are multiplied in float64 (exact, and never
    reduced in precision), no global setting is touched. On CPU float32 GEMMs are IEEE.
    """
    if plan.gemm_dtype != torch.float32 or device.type != "cuda":
        return plan.gemm_dtype
    ok = input_max_code < _BF16_EXACT_INT and weight_max_code * _odd_part(plan.code_multiplier) < _BF16_EXACT_INT
    return torch.float32 if ok else torch.float64


def _odd_part(v: float) -> int:
    """``c`` odd with ``v = c 2**j`` (``v`` a positive float): weight codes ``q v`` need the
    significant bits of ``q c``."""
    m, _ = math.frexp(v)
    c = int(m * 2.0**53)
    while c % 2 == 0:
        c //= 2
    return c


def effective_noise_std(cfg: ABFPConfig) -> float:
    """The device noise a product sees: ``noise_std / sqrt(repeats)`` in output LSBs (``k``
    repeats averaged, SPEC section 5; modelled by its standard deviation)."""
    return cfg.noise_std / math.sqrt(cfg.repeats) if cfg.repeats > 1 else cfg.noise_std


def draw_noise(shape: tuple[int, ...], cfg: ABFPConfig, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Device noise ``e`` in output LSBs (float32): uniform of width ``sqrt(12) std`` or Gaussian."""
    if cfg.noise_dist == "uniform":
        width = math.sqrt(12.0) * effective_noise_std(cfg)
        r = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
        return r.sub_(0.5).mul_(width)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).mul_(effective_noise_std(cfg))


def add_noise_(r: Tensor, cfg: ABFPConfig, generator: torch.Generator | None, key: int | None = None,
               index: Tensor | None = None) -> Tensor:
    """In place: ``r += e``, fresh device noise of ``r``'s shape.

    Uniform noise is counter-based (:mod:`abfp.numerics.counter_noise`): ``key`` (one draw
    from the product's generator) and the samples' flat ``index`` (int64, broadcast to
    ``r``) give it, the same on every device and in every kernel. Gaussian noise is drawn
    from ``generator``.
    """
    if cfg.noise_dist == "uniform":
        if key is None or index is None:
            raise ValueError("uniform device noise needs a key and the samples' index")
        # the samples are float32 values (their definition) on every path, float64 ones included
        return r.add_(noise_values(key, index, effective_noise_std(cfg), torch.float32).expand(r.shape))
    z = torch.randn(r.shape, generator=generator, device=r.device, dtype=r.dtype)
    return r.add_(z, alpha=effective_noise_std(cfg))
