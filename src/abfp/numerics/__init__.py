"""The device, as pure functions on tensors.

:func:`analog_product` is the single entry every higher layer uses: ``X @ W^T`` of batched
3-D operands on the configured device, by the fast path or the float64 reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ABFPConfig
from .adc import AdcPlan
from .blocks import Encoded, encode_operand, static_scale_value
from .kernels import ProductStats, analog_gemm
from .reference import ReferenceResult, reference_product

#: Bumped whenever the same configuration and seed give different numbers (a changed noise
#: stream, a fixed bug): caches of results (``abfp eval``'s) key on it, so a run never reuses
#: numbers an older version produced. 2: noise drawn as odd 16-bit lanes in two streams, and
#: convolutions at inference draw their noise in the column layout. 3: counter-based noise
#: (:mod:`.counter_noise`, indexed by sample, the same in every kernel) and the float32 sum
#: over tiles in a fixed order (t = 0, 1, ...).
NUMERICS_VERSION = 3

__all__ = [
    "NUMERICS_VERSION",
    "AdcPlan",
    "Encoded",
    "ProductStats",
    "ReferenceResult",
    "analog_product",
    "encode_weights",
    "reference_product",
]


def encode_weights(w3: Tensor, cfg: ABFPConfig, weight_scale: float | Tensor | None = None) -> Encoded:
    """Weight DAC: (B, N, K) -> codes (B, T, n, N) times ``G/n`` where exact, scales times ``n/(G L(b_y))``."""
    plan = AdcPlan.for_config(cfg)
    enc = encode_operand(
        w3,
        # a reduction shorter than the tile fills one tile partly: compute on its K columns
        # only (the padding is zeros; the ADC still has full scale n, set by the plan)
        n=max(1, min(cfg.tile_width, w3.shape[-1])),
        bits_max_code=cfg.weight_max_code,
        mode=cfg.mode,
        scale_dtype=cfg.scale_dtype,
        static_scale=weight_scale,
        as_rhs=True,
        code_multiplier=plan.code_multiplier,
    )
    enc.scales.mul_(plan.step)
    if plan.int8 and enc.codes.device.type == "cpu":
        enc.codes_i8 = (enc.codes / plan.code_multiplier).to(torch.int8)  # exact: integers up to 127
    return enc


def analog_product(
    x3: Tensor,
    w3: Tensor,
    cfg: ABFPConfig,
    *,
    input_scale: float | Tensor | None = None,
    weight_scale: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    stats: ProductStats | None = None,
    want_mask: bool = False,
    weights: Encoded | None = None,
    key: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``X @ W^T`` on the device, without bias: x3 (B, M, K), w3 (Bw, N, K) -> (B, M, N) float32.

    ``weights``: pre-encoded weights (a cache hit), else ``w3`` is encoded here. ``noise``
    (B, T, M, N) replaces the drawn device noise (tests). ``want_mask`` also returns the
    straight-through mask of the ADC clamp (B, T, M, N). ``key``: the counter-noise key of
    uniform noise (default: one drawn from ``generator``, :func:`.kernels.draw_key`); the
    traced custom operators (:mod:`abfp.ops.custom`) pass the key they drew in the graph.
    """
    if cfg.bf16_io:
        x3 = x3.to(torch.bfloat16)
        w3 = w3.to(torch.bfloat16)
    if cfg.kernel == "reference":
        ref = reference_product(
            x3,
            w3,
            cfg,
            input_scale=input_scale,
            weight_scale=weight_scale,
            noise=None if noise is None else noise.permute(0, 2, 3, 1),
            generator=generator,
        )
        if stats is not None:
            stats.saturated += int(ref.saturated.sum())
            stats.conversions += ref.saturated.numel()
        mask = (~ref.saturated).permute(0, 3, 1, 2).contiguous() if want_mask else None
        return ref.y.to(torch.float32), mask
    plan = AdcPlan.for_config(cfg)
    static = None
    if cfg.mode == "fixed":
        static = static_scale_value(x3, input_scale, cfg.scale_dtype)
    we = weights if weights is not None else encode_weights(w3, cfg, weight_scale)
    y, mask = analog_gemm(x3, we, cfg, plan, input_scale=static, generator=generator, noise=noise, stats=stats,
                          want_mask=want_mask, key=key)
    if cfg.bf16_io:
        y = y.to(torch.bfloat16).to(torch.float32)
    return y, mask
