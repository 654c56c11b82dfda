"""The one place that calls the device numerics: input checks, noise streams of functional calls,
the weight cache, and the autograd function of one analog product.

Every product family computes its products through :func:`product` (``X3 @ W3^T`` of 3-D
operands, SPEC section 1) or, for its fast inference path, through the encoded weights of
:data:`WEIGHT_CACHE` and :mod:`abfp.numerics` directly. Gradients are straight-through
estimators (see :mod:`abfp.functional`).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from ..config import ABFPConfig
from ..noise_keys import FUNCTIONAL_STREAMS, product_generator
from ..numerics import Encoded, ProductStats, analog_product, encode_weights
from ..numerics.blocks import block_scales, inside_clamp, pad_to_tiles, static_scales

__all__ = ["check_finite", "generator_for", "reseed", "WEIGHT_CACHE", "WeightCache", "clear_cache", "product",
           "without_bf16_io", "bf16", "promoted_dtype", "dequantised", "AnalogProduct"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------- input checks
def check_finite(t: Tensor, name: str) -> None:
    """Raise ValueError naming the operand when ``t`` holds NaN or Inf."""
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16), got {t.dtype}")
    # one reduction without temporaries; only a non-finite sum (NaN/Inf inside, or a
    # harmless overflow) pays for the exact element-wise check
    if t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float32))) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf; the analog device cannot encode it")


def generator_for(cfg: ABFPConfig, generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    return product_generator(cfg, FUNCTIONAL_STREAMS, device, generator)


def reseed(offset: int = 0) -> None:
    """Restart the noise streams of seeded functional calls at ``seed * 1_000_003 + offset``."""
    FUNCTIONAL_STREAMS.restart(offset)


# --------------------------------------------------------------------------- weight cache
class WeightCache:
    """Encoded weights keyed on (tensor identity, version, device config): encode once per value.

    A weight changed in place by ordinary ops (an optimizer step, ``load_state_dict``) bumps
    its version and is re-encoded. Writes through ``.data`` are invisible to the version
    counter: call :func:`clear_cache` after them.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._d: OrderedDict[tuple, tuple[weakref.ref, Encoded]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(w: Tensor, cfg: ABFPConfig, weight_scale: Any) -> tuple | None:
        try:
            version = w._version
        except Exception:  # inference tensors have no version counter
            return None
        if isinstance(weight_scale, Tensor):
            weight_scale = float(weight_scale)
        return (
            id(w), version, w.data_ptr(), tuple(w.shape), w.dtype, str(w.device),
            cfg.mode, cfg.tile_width, cfg.weight_bits, cfg.output_bits, cfg.input_bits,
            cfg.gain, cfg.scale_dtype, cfg.bf16_io, weight_scale,
        )

    def get(self, w: Tensor, w3: Tensor, cfg: ABFPConfig, weight_scale: Any) -> Encoded:
        key = self._key(w, cfg, weight_scale)
        w3 = w3.detach().to(torch.bfloat16) if cfg.bf16_io else w3.detach()
        if key is None:
            check_finite(w, "weight")
            return encode_weights(w3, cfg, weight_scale)
        with self._lock:
            hit = self._d.get(key)
            if hit is not None and hit[0]() is w:
                self._d.move_to_end(key)
                self.hits += 1
                return hit[1]
        check_finite(w, "weight")  # once per weight value
        enc = encode_weights(w3, cfg, weight_scale)
        with self._lock:
            self.misses += 1
            self._d[key] = (weakref.ref(w), enc)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)
            # drop stale versions of the same tensor
            for k in [k for k in self._d if k[0] == key[0] and k != key]:
                del self._d[k]
        return enc

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


WEIGHT_CACHE = WeightCache()


def clear_cache() -> None:
    """Forget every cached weight encoding."""
    WEIGHT_CACHE.clear()


# --------------------------------------------------------------------------- autograd
def dequantised(v3: Tensor, cfg: ABFPConfig, scale: Any, max_code: int) -> tuple[Tensor, Tensor]:
    """STE view of one operand: dequantised values (B, R, T, n) and the DAC clamp mask (B, R, K)."""
    n = cfg.tile_width
    v3 = v3.detach().to(torch.float32)
    s = block_scales(v3, n, cfg.scale_dtype) if cfg.mode == "abfp" else static_scales(v3, n, scale, cfg.scale_dtype)
    t = s.shape[-1]
    vt = pad_to_tiles(v3, n).reshape(*v3.shape[:-1], t, n)
    pos = (s > 0).unsqueeze(-1)
    safe = torch.where(pos, s.unsqueeze(-1), torch.ones_like(s.unsqueeze(-1)))
    q = torch.round(torch.clamp(vt / safe, -1.0, 1.0) * max_code) * (safe / max_code)
    q = torch.where(pos, q, torch.zeros_like(q))
    if cfg.mode == "abfp":
        # The block scale is the block's own max: its clamp only bites when the scale format
        # rounds the max down by a fraction of a code; that element keeps its gradient.
        return q, torch.ones(v3.shape, dtype=torch.bool, device=v3.device)
    return q, inside_clamp(v3, s, n)


class AnalogProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, w3, cfg, input_scale, weight_scale, generator, weights, stats):  # type: ignore[override]
        want_mask = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        y, mask = analog_product(
            x3, w3, cfg, input_scale=input_scale, weight_scale=weight_scale,
            generator=generator, stats=stats, want_mask=want_mask, weights=weights,
        )
        if want_mask:
            ctx.save_for_backward(x3, w3, mask)
            ctx.cfg, ctx.input_scale, ctx.weight_scale = cfg, input_scale, weight_scale
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x3, w3, mask = ctx.saved_tensors
        cfg = ctx.cfg
        gy = gy.to(torch.float32)
        B, M, K = x3.shape
        Bw, N = w3.shape[0], w3.shape[1]
        xq, mx = dequantised(x3, cfg, ctx.input_scale, cfg.input_max_code)  # (B, M, T, n)
        wq, mw = dequantised(w3, cfg, ctx.weight_scale, cfg.weight_max_code)  # (Bw, N, T, n)
        T, n = xq.shape[2], xq.shape[3]
        gx = gw = None
        if bool(mask.all()):
            # no ADC sample clipped: the tiles recombine into one GEMM each way
            xf = xq.reshape(B, M, T * n)[..., :K]
            wf = wq.reshape(Bw, N, T * n)[..., :K]
            if ctx.needs_input_grad[0]:
                gx = torch.matmul(gy, wf) * mx
            if ctx.needs_input_grad[1]:
                gw = torch.matmul(gy.transpose(1, 2), xf)
        else:
            gm = gy.unsqueeze(1) * mask  # (B, T, M, N)
            if ctx.needs_input_grad[0]:
                gx = torch.matmul(gm, wq.permute(0, 2, 1, 3))  # (B, T, M, n)
                gx = gx.permute(0, 2, 1, 3).reshape(B, M, T * n)[..., :K] * mx
            if ctx.needs_input_grad[1]:
                gw = torch.matmul(gm.transpose(-1, -2), xq.permute(0, 2, 1, 3))  # (B, T, N, n)
                gw = gw.permute(0, 2, 1, 3).reshape(B, N, T * n)[..., :K]
        if gw is not None:
            if Bw == 1 and B > 1:
                gw = gw.sum(0, keepdim=True)
            gw = gw * mw
            gw = gw.to(w3.dtype)
        if gx is not None:
            gx = gx.to(x3.dtype)
        return gx, gw, None, None, None, None, None, None


def product(
    x3: Tensor,
    w3: Tensor,
    cfg: ABFPConfig,
    *,
    input_scale: Any = None,
    weight_scale: Any = None,
    generator: torch.Generator | None = None,
    weights: Encoded | None = None,
    stats: ProductStats | None = None,
) -> Tensor:
    generator = generator_for(cfg, generator, x3.device)
    if torch.is_grad_enabled() and (x3.requires_grad or w3.requires_grad):
        return AnalogProduct.apply(x3, w3, cfg, input_scale, weight_scale, generator, weights, stats)
    y, _ = analog_product(
        x3, w3, cfg, input_scale=input_scale, weight_scale=weight_scale,
        generator=generator, stats=stats, weights=weights,
    )
    return y


@functools.lru_cache(maxsize=256)
def without_bf16_io(cfg: ABFPConfig) -> ABFPConfig:
    """``cfg`` without the bfloat16 rounding of its output: a layer with a bias rounds after
    adding it (SPEC 1 step 7: the bias add is digital, the layer output is bfloat16)."""
    return cfg.replace(bf16_io=False)


def bf16(t: Tensor) -> Tensor:
    """``t``'s values rounded to bfloat16 (round to nearest even), kept in float32 (differentiable)."""
    return t.to(torch.bfloat16).to(torch.float32)


def promoted_dtype(*ts: Tensor) -> torch.dtype:
    return torch.promote_types(ts[0].dtype, ts[1].dtype) if len(ts) > 1 else ts[0].dtype


# the names these had in abfp.functional (kept for code that imports them from there)
_generator_for, _WeightCache, _product = generator_for, WeightCache, product
_without_bf16_io, _bf16, _out_dtype, _dequantised, _AnalogProduct = without_bf16_io, bf16, promoted_dtype, dequantised, AnalogProduct
