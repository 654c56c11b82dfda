"""The one door into the numerics: ``linear``, ``matmul``, ``conv1d``, ``conv2d`` on the device.

Each behaves like its ``torch`` namesake (shapes, broadcasting, dtypes) but computes the
product as SPEC.md section 1 defines it. Gradients are straight-through estimators: rounding
is the identity and a clamp passes the gradient inside its range and zero outside, so
``d y / d X = mask_adc * W_hat * mask_dac`` with ``W_hat`` the dequantised weights. In ABFP
mode the DAC clamp never cuts a value (the scale is the block's max; bf16 rounding of that
max is a format artefact), so ``mask_dac`` is 1; in fixed mode it is ``|X| <= s``.

Noise comes from ``generator``; without one and with ``config.seed``, from the process-wide
stream of that seed (:data:`abfp.noise_keys.FUNCTIONAL_STREAMS`): successive calls draw
different noise, and :func:`reseed` (or ``abfp.reseed()``) restarts the streams, so the same
sequence of calls after it gives the same numbers. Without a seed, from torch's global
generator. (Before numerics of this release a seeded call drew the same noise on every call.)

Fixed mode (SPEC section 2) without ``input_scale``: the one tensor of a call is its own sample
data, so its static scale is max |x| over the whole tensor (every row, batch item and chunk of
the call share it); a converted model instead needs :func:`abfp.calibrate`.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ABFPConfig
from .numerics import AdcPlan, Encoded, ProductStats, analog_product, encode_weights
from .numerics.conv import conv2d_fused
from .numerics.kernels import CHUNK_ELEMENTS, analog_gemm_cols, draw_key, use_fused
from .numerics.workspace import scratch
from .numerics.blocks import block_scales, inside_clamp, pad_to_tiles, static_scale_value, static_scales
from .noise_keys import FUNCTIONAL_STREAMS, product_generator

__all__ = ["linear", "matmul", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
           "einsum", "clear_cache", "check_finite", "reseed"]

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


def _generator_for(cfg: ABFPConfig, generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    return product_generator(cfg, FUNCTIONAL_STREAMS, device, generator)


def reseed(offset: int = 0) -> None:
    """Restart the noise streams of seeded functional calls at ``seed * 1_000_003 + offset``."""
    FUNCTIONAL_STREAMS.restart(offset)


# --------------------------------------------------------------------------- weight cache
class _WeightCache:
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


WEIGHT_CACHE = _WeightCache()


def clear_cache() -> None:
    """Forget every cached weight encoding."""
    WEIGHT_CACHE.clear()


# --------------------------------------------------------------------------- autograd
def _dequantised(v3: Tensor, cfg: ABFPConfig, scale: Any, max_code: int) -> tuple[Tensor, Tensor]:
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


class _AnalogProduct(torch.autograd.Function):
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
        xq, mx = _dequantised(x3, cfg, ctx.input_scale, cfg.input_max_code)  # (B, M, T, n)
        wq, mw = _dequantised(w3, cfg, ctx.weight_scale, cfg.weight_max_code)  # (Bw, N, T, n)
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


def _product(
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
    generator = _generator_for(cfg, generator, x3.device)
    if torch.is_grad_enabled() and (x3.requires_grad or w3.requires_grad):
        return _AnalogProduct.apply(x3, w3, cfg, input_scale, weight_scale, generator, weights, stats)
    y, _ = analog_product(
        x3, w3, cfg, input_scale=input_scale, weight_scale=weight_scale,
        generator=generator, stats=stats, weights=weights,
    )
    return y


@functools.lru_cache(maxsize=256)
def _without_bf16_io(cfg: ABFPConfig) -> ABFPConfig:
    """``cfg`` without the bfloat16 rounding of its output: a layer with a bias rounds after
    adding it (SPEC 1 step 7: the bias add is digital, the layer output is bfloat16)."""
    return cfg.replace(bf16_io=False)


def _bf16(t: Tensor) -> Tensor:
    """``t``'s values rounded to bfloat16 (round to nearest even), kept in float32 (differentiable)."""
    return t.to(torch.bfloat16).to(torch.float32)


def _out_dtype(*ts: Tensor) -> torch.dtype:
    return torch.promote_types(ts[0].dtype, ts[1].dtype) if len(ts) > 1 else ts[0].dtype


# --------------------------------------------------------------------------- public API
def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    config: ABFPConfig,
    input_scale: float | Tensor | None = None,
    weight_scale: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    stats: ProductStats | None = None,
    cache: bool = True,
) -> Tensor:
    """``y = x W^T + b`` on the device; ``x``: (..., K), ``weight``: (N, K), ``bias``: (N,).

    In ``fixed`` mode ``input_scale`` and ``weight_scale`` are the static per-tensor scales
    (default: each tensor's own max |value| over the whole call). Weight encodings are cached
    per weight value (``cache=False`` re-encodes every call). Bias is added digitally in
    float32: ``y = Y + b``; with ``bf16_io`` the inputs and weights are rounded to bfloat16 and
    the output after the bias, ``y = bf16(Y + b)`` (SPEC 1 step 7).
    """
    check_finite(x, "input")
    if not cache:
        check_finite(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input's last dimension ({x.shape[-1] if x.dim() else 'scalar'}) must equal weight's in_features ({weight.shape[1]})"
        )
    if bias is not None:
        check_finite(bias, "bias")
    out_dtype = x.dtype
    lead = x.shape[:-1]
    x3 = x.reshape(1, math.prod(lead), x.shape[-1])
    w3 = weight.unsqueeze(0)
    weights = WEIGHT_CACHE.get(weight, w3, config, weight_scale) if cache else None
    device = config
    if config.bf16_io and bias is not None:
        # round the inputs here and the output after the bias (not before it)
        device, x3, w3 = _without_bf16_io(config), _bf16(x3), _bf16(w3)
    y = _product(x3, w3, device, input_scale=input_scale, weight_scale=weight_scale,
                 generator=generator, weights=weights, stats=stats)
    y = y.reshape(*lead, weight.shape[0])
    if bias is not None:
        y.add_(bias.to(torch.float32))  # y is this call's own tensor
        if config.bf16_io:
            y = _bf16(y)
    return y.to(out_dtype)


def matmul(
    a: Tensor,
    b: Tensor,
    *,
    config: ABFPConfig,
    generator: torch.Generator | None = None,
    stats: ProductStats | None = None,
    a_scale: float | Tensor | None = None,
    b_scale: float | Tensor | None = None,
) -> Tensor:
    """``torch.matmul(a, b)`` on the device, batch dims broadcast; both operands get dynamic
    block scales along the reduction axis. In ``fixed`` mode ``a_scale``/``b_scale`` are the
    static per-tensor scales (default: each tensor's max |value|)."""
    check_finite(a, "first operand")
    check_finite(b, "second operand")
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError("matmul needs operands of at least one dimension")
    out_dtype = _out_dtype(a, b)
    squeeze_a = a.dim() == 1
    squeeze_b = b.dim() == 1
    if squeeze_a:
        a = a.unsqueeze(0)
    if squeeze_b:
        b = b.unsqueeze(-1)
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul shapes do not match: {tuple(a.shape)} @ {tuple(b.shape)}")
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    nb = math.prod(batch)  # not -1: a product with zero rows or columns has no size to infer
    a3 = a.expand(*batch, M, K).reshape(nb, M, K)
    w3 = b.expand(*batch, K, N).transpose(-1, -2).reshape(nb, N, K)
    y = _product(a3, w3, config, input_scale=a_scale, weight_scale=b_scale,
                 generator=generator, stats=stats).reshape(*batch, M, N)
    if squeeze_a:
        y = y.squeeze(-2)
    if squeeze_b:
        y = y.squeeze(-1)
    return y.to(out_dtype)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


#: Patch-matrix elements built at once by conv2d (float32: 4 MiB).
_IM2COL_ELEMENTS = 1 << 20


def _im2col(x: Tensor, kh: int, kw: int, stride: tuple[int, int], dilation: tuple[int, int], ho: int, wo: int) -> Tensor:
    """Patches of a padded input, channels last: (B, Ho, Wo, C, kh*kw), i.e. each row in
    ``F.unfold`` order (channel-major, then kernel row, kernel column). One strided copy per
    kernel offset (``F.unfold`` is far slower on CPU)."""
    xl = x.permute(0, 2, 3, 1)  # (B, H, W, C) view
    if kh == kw == 1:
        return xl[:, : stride[0] * (ho - 1) + 1 : stride[0], : stride[1] * (wo - 1) + 1 : stride[1], :].unsqueeze(-1)
    slices = []
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            slices.append(xl[:, r0 : r0 + stride[0] * (ho - 1) + 1 : stride[0], c0 : c0 + stride[1] * (wo - 1) + 1 : stride[1], :])
    return torch.stack(slices, dim=-1)


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    config: ABFPConfig,
    input_scale: float | Tensor | None = None,
    weight_scale: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    stats: ProductStats | None = None,
    cache: bool = True,
) -> Tensor:
    """``F.conv2d`` on the device, as im2col: the reduction axis is ``C_in/groups * k_h * k_w``
    in ``unfold`` order; grouped (and depthwise) convolutions run one product per group.

    Fixed mode without ``input_scale``: max |x| over the whole input tensor. Bias as in
    :func:`linear` (with ``bf16_io``: ``bf16(Y + b)``). An empty batch gives an empty output
    of the right shape."""
    check_finite(x, "input")
    if not cache:
        check_finite(weight, "weight")
    if bias is not None:
        check_finite(bias, "bias")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d needs a 4-D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    out_dtype = x.dtype
    bt, c, h, w_ = x.shape
    cout, cg, kh, kw = weight.shape
    if c != cg * groups or cout % groups:
        raise ValueError(f"conv2d: input has {c} channels, weight expects {cg} x groups={groups}")
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            raise ValueError(f"unknown padding {padding!r}")
    else:
        ph, pw = _pair(padding)
        pads = (pw, pw, ph, ph)
    hp, wp = x.shape[2] + pads[2] + pads[3], x.shape[3] + pads[0] + pads[1]
    ho = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho <= 0 or wo <= 0:
        raise ValueError("conv2d: the kernel is larger than the (padded) input")
    kg = cg * kh * kw
    w3 = weight.reshape(groups, cout // groups, kg)
    weights = WEIGHT_CACHE.get(weight, w3, config, weight_scale) if cache else None
    generator = _generator_for(config, generator, x.device)  # one stream for every chunk of the call
    device = config
    if config.bf16_io and bias is not None:
        # round the inputs here and the output after the bias (not before it)
        device, x, w3 = _without_bf16_io(config), _bf16(x), _bf16(w3)
    if config.mode == "fixed" and input_scale is None:
        input_scale = x.detach().abs().max() if x.numel() else 0.0  # one scale for the whole tensor
    fast = config.kernel != "reference" and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    if fast and bt > 0:
        if weights is None:
            weights = encode_weights(w3.detach().to(torch.bfloat16) if device.bf16_io else w3.detach(), device,
                                     weight_scale)
        y = _conv2d_cols(x, pads, weights, device, groups, (kh, kw), stride, dilation, (ho, wo), input_scale,
                         generator, stats, channels_last=_channels_last(x) or _channels_last(weight))
    else:
        y = _conv2d_rows(F.pad(x, pads) if any(pads) else x, w3, weights, device, groups, (kh, kw), stride, dilation, (ho, wo), input_scale,
                         weight_scale, generator, stats)
    if bias is not None:
        y.add_(bias.to(torch.float32).view(1, -1, 1, 1))  # y is this call's own tensor
        if config.bf16_io:
            y = _bf16(y)
    if unbatched:
        y = y.squeeze(0)
    return y.to(out_dtype)


def _channels_last(t: Tensor) -> bool:
    """``t`` is laid out channels-last (and not also plain contiguous, as a 1-channel or 1x1
    tensor is): the rule by which ``F.conv2d`` picks its output's memory format."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _conv2d_rows(x: Tensor, w3: Tensor, weights: Encoded, config: ABFPConfig, groups: int, k: tuple[int, int],
                 stride: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int], input_scale: Any,
                 weight_scale: Any, generator: torch.Generator | None, stats: ProductStats | None) -> Tensor:
    """Convolution as row-major patches through :func:`_product` (the path with gradients and
    the float64 reference): im2col a few images at a time, keeping memory near the float32
    convolution's."""
    bt, c = x.shape[0], x.shape[1]
    (kh, kw), (ho, wo) = k, out_hw
    cout, kg = w3.shape[0] * w3.shape[1], w3.shape[2]
    per_image = ho * wo * c * kh * kw
    step = max(1, _IM2COL_ELEMENTS // max(1, per_image))
    outs = []
    for i in range(0, max(bt, 1), step):  # an empty batch still makes one (empty) product
        xi = x[i : i + step]
        bi = xi.shape[0]
        cols = _im2col(xi, kh, kw, stride, dilation, ho, wo).reshape(bi * ho * wo, groups, kg).permute(1, 0, 2)
        yi = _product(cols, w3, config, input_scale=input_scale, weight_scale=weight_scale,
                      generator=generator, weights=weights, stats=stats)  # (G, bi*L, cout/G)
        outs.append(yi.reshape(groups, bi, ho, wo, cout // groups).permute(1, 0, 4, 2, 3).reshape(bi, cout, ho, wo))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _conv2d_cols(x: Tensor, pads: tuple[int, int, int, int], weights: Encoded, config: ABFPConfig, groups: int,
                 k: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int],
                 input_scale: Any, generator: torch.Generator | None, stats: ProductStats | None,
                 channels_last: bool) -> Tensor:
    """Inference convolution in the column layout: through the compiled kernels
    (:func:`abfp.numerics.conv.conv2d_fused`) where :func:`use_fused` allows, else with torch
    operations as below (:func:`abfp.numerics.kernels.analog_gemm_cols`), the same numbers.

    A few images at a time (or, for a large image, a few output rows), the input is copied
    padded, channels first, ``xc[c, b, h, w]``, and the patches are built from it,
    ``cols[c, i*kw + j, b, h, w] = xc[c, b, h*s + i*d, w*s + j*d]`` (one copy from a strided
    view, image rows read contiguously), into buffers reused across chunks. The
    output's memory format follows ``F.conv2d``'s: channels-last when the input or the weight
    is channels-last (then pooling and batch norm after it run several times faster), else
    contiguous NCHW, so code after the layer sees the strides it would see in float32.
    """
    bt, c, h, w_ = x.shape
    (kh, kw), (ho, wo) = k, out_hw
    cout = weights.codes.shape[0] * weights.codes.shape[3]
    T = weights.codes.shape[1]
    plan = AdcPlan.for_config(config)
    static = static_scale_value(x, input_scale, config.scale_dtype) if config.mode == "fixed" else None
    key = draw_key(config, generator)
    if use_fused(config, plan, x.device):
        return conv2d_fused(x, pads, weights, config, plan, groups, k, stride, dilation, out_hw, static, key, stats,
                            channels_last)
    pl, pr, pt, pb = pads
    src = (x.to(torch.bfloat16) if config.bf16_io else x).transpose(0, 1)  # (C, B, H, W) view
    y = torch.empty(bt, cout, ho, wo, dtype=torch.float32, device=x.device,
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # output rows per chunk: bounded by the patches (c*kh*kw per output) and the partial sums (T*cout)
    per_row = wo * max(c * kh * kw, 1)
    rows = max(1, min(_IM2COL_ELEMENTS // per_row, CHUNK_ELEMENTS // max(1, wo * T * cout)))
    if rows >= ho:
        step_b = max(1, rows // ho)
        chunks = [(b, min(bt, b + step_b), 0, ho) for b in range(0, bt, step_b)]
    else:
        chunks = [(b, b + 1, r, min(ho, r + rows)) for b in range(bt) for r in range(0, ho, rows)]
    nb, nh = chunks[0][1] - chunks[0][0], chunks[0][3] - chunks[0][2]
    buf = scratch("patches", (c * kh * kw * nb * nh * wo,), torch.float32, x.device)
    # the padded images of one chunk, channels first (the border is zeroed once per call)
    xc = scratch("padded_input", (c, nb, h + pt + pb, w_ + pl + pr), torch.float32, x.device)
    if any(pads):
        xc.zero_()
    (sh, sw), (dh, dw) = stride, dilation
    for b0, b1, h0, h1 in chunks:
        b, hr = b1 - b0, h1 - h0
        if h0 == 0:
            xc[:, :b, pt : pt + h, pl : pl + w_].copy_(src[:, b0:b1])
        cols = buf[: c * kh * kw * b * hr * wo].view(c, kh, kw, b, hr, wo)
        # every kernel offset at once: a strided view of the padded images, one copy
        sc, sb, sy, sx_ = xc.stride()
        cols.copy_(xc.as_strided((c, kh, kw, b, hr, wo), (sc, dh * sy, dw * sx_, sb, sh * sy, sw * sx_),
                                 xc.storage_offset() + h0 * sh * sy))
        yi = analog_gemm_cols(cols.view(groups, (c // groups) * kh * kw, b * hr * wo), weights, config, plan,
                              input_scale=static, generator=generator, key=key, p_off=(b0 * ho + h0) * wo,
                              p_total=bt * ho * wo, stats=stats)  # (G, Ng, P)
        y[b0:b1, :, h0:h1].copy_(yi.view(cout, b, hr, wo).transpose(0, 1))
    if config.bf16_io:
        y = y.to(torch.bfloat16).to(torch.float32)
    return y


def conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    config: ABFPConfig,
    input_scale: float | Tensor | None = None,
    weight_scale: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    stats: ProductStats | None = None,
    cache: bool = True,
) -> Tensor:
    """``F.conv1d`` on the device (as a conv2d of height 1)."""
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 3 or weight.dim() != 3:
        raise ValueError(f"conv1d needs a 3-D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    s = stride if isinstance(stride, int) else stride[0]
    d = dilation if isinstance(dilation, int) else dilation[0]
    p: int | str | tuple[int, int] = padding if isinstance(padding, str) else (0, padding if isinstance(padding, int) else padding[0])
    y = conv2d(
        x.unsqueeze(2), weight.unsqueeze(2), bias, (1, s), p, (1, d), groups,
        config=config, input_scale=input_scale, weight_scale=weight_scale,
        generator=generator, stats=stats, cache=False,
    )
    y = y.squeeze(2)
    return y.squeeze(0) if unbatched else y


def einsum(
    equation: str,
    a: Tensor,
    b: Tensor,
    *,
    config: ABFPConfig,
    generator: torch.Generator | None = None,
    stats: ProductStats | None = None,
    a_scale: float | Tensor | None = None,
    b_scale: float | Tensor | None = None,
) -> Tensor:
    """A two-operand ``torch.einsum`` whose contraction runs on the device.

    Indices in both operands and the output are batch axes, in both operands only are
    reduced (the analog reduction axis), in one operand and the output are free. Indices
    found in one operand only and not in the output are summed digitally first. In ``fixed``
    mode ``a_scale``/``b_scale`` are the static scales (default: each operand's own max |value|).
    """
    eq = equation.replace(" ", "")
    if "->" not in eq:
        lhs = eq
        letters = [ch for ch in lhs.replace(",", "") if ch != "."]
        out = "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    else:
        lhs, out = eq.split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        raise ValueError("abfp einsum takes exactly two operands")
    sa, sb = parts
    if "." in eq:
        sa, sb, out = _expand_ellipsis(sa, sb, out, a.dim(), b.dim())
    if len(sa) != a.dim() or len(sb) != b.dim():
        raise ValueError(f"einsum subscripts {equation!r} do not match operand ranks {a.dim()}, {b.dim()}")
    # sum away indices private to one operand and absent from the output
    for s_name in ("a", "b"):
        s, other, t = (sa, sb, a) if s_name == "a" else (sb, sa, b)
        private = [i for i, ch in enumerate(s) if ch not in other and ch not in out]
        if private:
            t = t.sum(dim=private)
            s = "".join(ch for i, ch in enumerate(s) if i not in private)
        if s_name == "a":
            sa, a = s, t
        else:
            sb, b = s, t
    batch = [ch for ch in out if ch in sa and ch in sb]
    red = [ch for ch in sa if ch in sb and ch not in out]
    fa = [ch for ch in sa if ch not in sb]
    fb = [ch for ch in sb if ch not in sa]
    sizes = {ch: a.shape[i] for i, ch in enumerate(sa)}
    for i, ch in enumerate(sb):
        sizes[ch] = max(sizes.get(ch, 1), b.shape[i])
    pa = a.permute([sa.index(ch) for ch in batch + fa + red])
    pb = b.permute([sb.index(ch) for ch in batch + fb + red])
    pa = pa.expand(*[sizes[ch] for ch in batch], *pa.shape[len(batch):])
    pb = pb.expand(*[sizes[ch] for ch in batch], *pb.shape[len(batch):])
    bsz = math.prod(sizes[ch] for ch in batch)
    m = math.prod(sizes[ch] for ch in fa)
    n_ = math.prod(sizes[ch] for ch in fb)
    k = math.prod(sizes[ch] for ch in red)
    a3 = pa.reshape(bsz, m, k)
    w3 = pb.reshape(bsz, n_, k)
    check_finite(a3, "first operand")
    check_finite(w3, "second operand")
    y = _product(a3, w3, config, input_scale=a_scale, weight_scale=b_scale, generator=generator,
                 stats=stats).to(_out_dtype(a, b))
    y = y.reshape([sizes[ch] for ch in batch + fa + fb])
    cur = batch + fa + fb
    return y.permute([cur.index(ch) for ch in out])


def _expand_ellipsis(sa: str, sb: str, out: str, da: int, db: int) -> tuple[str, str, str]:
    used = set((sa + sb + out).replace(".", ""))
    spare = [chr(c) for c in range(ord("A"), ord("Z") + 1) if chr(c) not in used]
    na = da - len(sa.replace("...", ""))
    nb = db - len(sb.replace("...", ""))
    ne = max(na, nb)
    ell = "".join(spare[:ne])
    sa = sa.replace("...", ell[ne - na:]) if "..." in sa else sa
    sb = sb.replace("...", ell[ne - nb:]) if "..." in sb else sb
    out = out.replace("...", ell) if "..." in out else out
    return sa, sb, out


from .ops.conv_nd import conv3d, conv_transpose1d, conv_transpose2d, conv_transpose3d  # noqa: E402  (3-D and transposed)
