"""The convolution family (1-D and 2-D): ``F.conv1d``/``F.conv2d`` on the device, as im2col.

Per family: the argument parser (:func:`conv_args`, also used by the noise views and 3-D
convolutions), the public functions (:func:`conv1d`, :func:`conv2d`, re-exported by
:mod:`abfp.functional`), the MAC/tile accounting (``K = C_in/groups * prod(kernel)``, one dot
product of length ``K`` per output element), the reference/gradient path (:func:`_conv2d_rows`,
row-major patches through :func:`abfp.ops.device.product`), the fast inference path
(:func:`_conv2d_cols`, column layout through the compiled kernels) and the handler.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ABFPConfig
from ..numerics import AdcPlan, Encoded, ProductStats, encode_weights
from ..numerics.blocks import static_scale_value
from ..numerics.counter_noise import derived_key
from ..numerics import dequant, fused
from ..numerics.col2im import col2im
from ..numerics.conv import conv2d_fused
from ..numerics.kernels import CHUNK_ELEMENTS, analog_gemm_cols, draw_key, plan_chunks, use_fused
from ..numerics.workspace import scratch
from .device import (WEIGHT_CACHE, NotTraceable, bf16, check_finite, config_json, dequantised_rows, encoded_weights,
                     first_order_only, generator_for, product, scale_arg, ste_grads, traced_key, tracing,
                     shift_for_overflow, unshift_output, without_bf16_io)
from .registry import register
from .site import Frame, run_product

__all__ = ["conv1d", "conv2d", "conv_args", "answer_conv"]


def int_pair(v: int | Sequence[int]) -> tuple[int, int]:
    """A convolution argument (stride, padding, dilation) as ``(height, width)``."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


#: Patch-matrix elements built at once by conv2d (float32: 4 MiB).
_IM2COL_ELEMENTS = 1 << 20


def _im2col(x: Tensor, kh: int, kw: int, stride: tuple[int, int], dilation: tuple[int, int], ho: int, wo: int,
            out: Tensor | None = None) -> Tensor:
    """Patches of a padded input, channels last: (B, Ho, Wo, C, kh*kw), i.e. each row in
    ``F.unfold`` order (channel-major, then kernel row, kernel column). One strided copy per
    kernel offset (``F.unfold`` is far slower on CPU). ``out``: where to stack them (not
    for a 1x1 kernel, whose patches are a view of ``x``; no autograd)."""
    xl = x.permute(0, 2, 3, 1)  # (B, H, W, C) view
    if kh == kw == 1:
        return xl[:, : stride[0] * (ho - 1) + 1 : stride[0], : stride[1] * (wo - 1) + 1 : stride[1], :].unsqueeze(-1)
    slices = []
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            slices.append(xl[:, r0 : r0 + stride[0] * (ho - 1) + 1 : stride[0], c0 : c0 + stride[1] * (wo - 1) + 1 : stride[1], :])
    return torch.stack(slices, dim=-1, out=out)


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
    key: int | None = None,
) -> Tensor:
    """``F.conv2d`` on the device, as im2col: the reduction axis is ``C_in/groups * k_h * k_w``
    in ``unfold`` order; grouped (and depthwise) convolutions run one product per group.

    Fixed mode without ``input_scale``: max |x| over the whole input tensor. Bias as in
    :func:`linear` (with ``bf16_io``: ``bf16(Y + b)``). An empty batch gives an empty output
    of the right shape. ``key``: the uniform-noise key (default: drawn from the generator).
    Under a tracer the inference product is the custom operator ``abfp::conv2d`` and the
    product with gradients ``abfp::device`` on the patches (:mod:`abfp.ops.custom`)."""
    traced = tracing()
    if not traced:
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
    stride, dilation = int_pair(stride), int_pair(dilation)
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
        ph, pw = int_pair(padding)
        pads = (pw, pw, ph, ph)
    hp, wp = x.shape[2] + pads[2] + pads[3], x.shape[3] + pads[0] + pads[1]
    ho = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho <= 0 or wo <= 0:
        raise ValueError("conv2d: the kernel is larger than the (padded) input")
    kg = cg * kh * kw
    w3 = weight.reshape(groups, cout // groups, kg)
    if traced:
        y = _conv2d_traced(x, weight, w3, bias, pads, stride, dilation, groups, (kh, kw), (ho, wo), config,
                           input_scale, weight_scale, generator, stats, cache)
        return (y.squeeze(0) if unbatched else y).to(out_dtype)
    weights = WEIGHT_CACHE.get(weight, w3, config, weight_scale) if cache else None
    generator = generator_for(config, generator, x.device)  # one stream for every chunk of the call
    device = config
    if config.bf16_io and bias is not None:
        # round the inputs here and the output after the bias (not before it)
        device, x, w3 = without_bf16_io(config), bf16(x), bf16(w3)
    if config.mode == "fixed" and input_scale is None:
        input_scale = x.detach().abs().max() if x.numel() else 0.0  # one scale for the whole tensor
    fast = config.kernel != "reference" and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    # an empty batch, or an empty reduction (no input channels: every output is the empty sum 0), has
    # nothing to tile: the row path gives its zeros
    work = bt > 0 and kg > 0
    if work and (fast or trains_in_columns(device, x, w3)):
        if weights is None:
            weights = encode_weights(w3.detach().to(torch.bfloat16) if device.bf16_io else w3.detach(), device,
                                     weight_scale)
    if fast and work:
        y = _conv2d_cols(x, pads, weights, device, groups, (kh, kw), stride, dilation, (ho, wo), input_scale,
                         generator, stats, channels_last=_channels_last(x) or _channels_last(weight), key=key)
    elif work and trains_in_columns(device, x, w3):
        geometry = ConvGeometry(pads, stride, dilation, groups, (kh, kw), (ho, wo))
        y = _conv2d_train(x, w3, geometry, weights, device, input_scale, weight_scale, generator, stats, key)
    else:
        y = _conv2d_rows(F.pad(x, pads) if any(pads) else x, w3, weights, device, groups, (kh, kw), stride, dilation, (ho, wo), input_scale,
                         weight_scale, generator, stats, key=key)
    if bias is not None:
        y.add_(bias.to(torch.float32).view(1, -1, 1, 1))  # y is this call's own tensor
        if config.bf16_io:
            y = bf16(y)
    if unbatched:
        y = y.squeeze(0)
    return y.to(out_dtype)


def _conv2d_traced(x: Tensor, weight: Tensor, w3: Tensor, bias: Tensor | None, pads: tuple[int, int, int, int],
                   stride: tuple[int, int], dilation: tuple[int, int], groups: int, k: tuple[int, int],
                   out_hw: tuple[int, int], config: ABFPConfig, input_scale: Any, weight_scale: Any,
                   generator: torch.Generator | None, stats: ProductStats | None, cache: bool) -> Tensor:
    """:func:`conv2d` under a tracer, the same numbers as eager: inference as the custom operator
    ``abfp::conv2d`` (column layout, compiled kernels), with gradients (or the reference kernel)
    as the row-major patches through ``abfp::device``; the bias add and bfloat16 rounding in the graph."""
    if stats is not None:
        raise NotTraceable("a convolution with ADC statistics (abfp.summary recording) cannot be traced")
    if bias is not None:
        torch._assert_async(torch.isfinite(bias).all(), "bias contains NaN or Inf; the analog device cannot encode it")
    device, wsrc = config, weight
    if config.bf16_io and bias is not None:
        # round the inputs here and the output after the bias (not before it)
        device, x, w3 = without_bf16_io(config), bf16(x), bf16(w3)
        wsrc = weight if cache else bf16(weight)
    wcfg = config_json(config) if cache else ""
    generator = generator_for(config, generator, x.device)
    fast = config.kernel != "reference" and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    if fast:
        y = torch.ops.abfp.conv2d(x, wsrc, list(pads), list(stride), list(dilation), groups, config_json(device), wcfg,
                                  scale_arg(input_scale), scale_arg(weight_scale), traced_key(device, generator))
    else:
        if config.mode == "fixed" and input_scale is None:
            raise NotTraceable("a fixed-point convolution with gradients needs its input_scale to be traced")
        y = _conv2d_rows(F.pad(x, pads) if any(pads) else x, w3, None, device, groups, k, stride, dilation, out_hw,
                         input_scale, weight_scale, generator, None, weight_config=config if cache else None)
    if bias is not None:
        y = y + bias.to(torch.float32).view(1, -1, 1, 1)
        if config.bf16_io:
            y = bf16(y)
    return y


def conv2d_columns(x: Tensor, weight: Tensor, pads: tuple[int, ...], stride: tuple[int, ...],
                   dilation: tuple[int, ...], groups: int, config: ABFPConfig, weight_config: str,
                   input_scale: float | None, weight_scale: float | None, key: int | None) -> Tensor:
    """The body of the custom operator ``abfp::conv2d``: the input check, the weight encoding
    (:func:`abfp.ops.device.encoded_weights`) and :func:`_conv2d_cols`, without bias."""
    check_finite(x, "input")
    cout, cg, kh, kw = weight.shape
    w3 = weight.reshape(groups, cout // groups, cg * kh * kw)
    weights = encoded_weights(weight, w3, config, weight_config, weight_scale)
    ho = (x.shape[2] + pads[2] + pads[3] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + pads[0] + pads[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return _conv2d_cols(x, tuple(pads), weights, config, groups, (kh, kw), tuple(stride), tuple(dilation),  # type: ignore[arg-type]
                        (ho, wo), input_scale, None, None, channels_last=False, key=key)


def _channels_last(t: Tensor) -> bool:
    """``t`` is laid out channels-last (and not also plain contiguous, as a 1-channel or 1x1
    tensor is): the rule by which ``F.conv2d`` picks its output's memory format."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _im2col_step(c: int, k: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Images per im2col chunk of :func:`_conv2d_rows`: about :data:`_IM2COL_ELEMENTS` patch elements."""
    return max(1, _IM2COL_ELEMENTS // max(1, out_hw[0] * out_hw[1] * c * k[0] * k[1]))


def chunk_key(key: int, i: int) -> int:
    """The noise key of the im2col chunk starting at image ``i`` of a product under ``key``: a
    splitmix64 mix of both (:func:`~abfp.numerics.counter_noise.derived_key`; not ``key``
    shifted, whose counter streams would overlap), in ``[0, 2^63)`` like a drawn key."""
    return derived_key(key, i)


def _conv2d_rows(x: Tensor, w3: Tensor, weights: Encoded, config: ABFPConfig, groups: int, k: tuple[int, int],
                 stride: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int], input_scale: Any,
                 weight_scale: Any, generator: torch.Generator | None, stats: ProductStats | None,
                 key: int | None = None, weight_config: ABFPConfig | None = None, step: int | None = None) -> Tensor:
    """Convolution as row-major patches through :func:`product` (the path with gradients and
    the float64 reference): im2col a few images at a time (``step``: default
    :func:`_im2col_step`), keeping memory near the float32 convolution's. Under an explicit
    noise ``key`` the chunk starting at image ``i > 0`` runs under :func:`chunk_key` ``(key, i)``:
    one key numbers the samples of one product, so chunks under the same key would repeat its
    noise image after image (the first chunk keeps ``key``: one chunk is the column path's product)."""
    bt, c = x.shape[0], x.shape[1]
    (kh, kw), (ho, wo) = k, out_hw
    cout, kg = w3.shape[0] * w3.shape[1], w3.shape[2]
    step = step or _im2col_step(c, k, out_hw)
    symbolic = isinstance(bt, torch.SymInt)  # an export with a dynamic batch: one chunk, no loop over its size
    outs = []
    for i in [0] if symbolic else range(0, max(bt, 1), step):  # an empty batch still makes one (empty) product
        xi = x if symbolic else x[i : i + step]
        bi = xi.shape[0]
        cols = _im2col(xi, kh, kw, stride, dilation, ho, wo).reshape(bi * ho * wo, groups, kg).permute(1, 0, 2)
        ki = key if key is None or i == 0 else chunk_key(key, i)
        yi = product(cols, w3, config, input_scale=input_scale, weight_scale=weight_scale, generator=generator,
                     weights=weights, stats=stats, key=ki, weight_config=weight_config)  # (G, bi*L, cout/G)
        outs.append(yi.reshape(groups, bi, ho, wo, cout // groups).permute(1, 0, 4, 2, 3).reshape(bi, cout, ho, wo))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _conv2d_cols(x: Tensor, pads: tuple[int, int, int, int], weights: Encoded, config: ABFPConfig, groups: int,
                 k: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int],
                 input_scale: Any, generator: torch.Generator | None, stats: ProductStats | None,
                 channels_last: bool, key: int | None = None, inside: Tensor | None = None) -> Tensor:
    """:func:`_columns` of ``x * 2**-s`` times ``2**s``, exactly its value: ``s`` =
    :func:`~abfp.ops.device.overflow_shift`, 0 but for inputs beyond about 1e35, whose tiles'
    float32 rescale would overflow (:func:`~abfp.ops.device.shift_for_overflow`, ``unshift_output``)."""
    s, xs, s_in = shift_for_overflow(x, config, input_scale)
    y = _columns(xs, pads, weights, config, groups, k, stride, dilation, out_hw, s_in, generator, stats, channels_last,
                 key, inside)
    return unshift_output(y, s, x, weights)


def _columns(x: Tensor, pads: tuple[int, int, int, int], weights: Encoded, config: ABFPConfig, groups: int,
             k: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int],
             input_scale: Any, generator: torch.Generator | None, stats: ProductStats | None,
             channels_last: bool, key: int | None = None, inside: Tensor | None = None) -> Tensor:
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
    ``inside``: the straight-through mask to fill (see :func:`abfp.numerics.conv.conv2d_fused`).
    """
    bt, c, h, w_ = x.shape
    (kh, kw), (ho, wo) = k, out_hw
    cout = weights.codes.shape[0] * weights.codes.shape[3]
    T = weights.codes.shape[1]
    plan = AdcPlan.for_config(config)
    static = static_scale_value(x, input_scale, config.scale_dtype) if config.mode == "fixed" else None
    if key is None:
        key = draw_key(config, generator)
    if bt == 0 or ho * wo == 0 or c == 0:  # nothing to convert (an empty batch or reduction): no chunk to plan
        # (no input channels: every output is the empty sum, 0)
        y = torch.empty(bt, cout, ho, wo, dtype=torch.float32, device=x.device,
                        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return y.zero_() if c == 0 else y
    if use_fused(config, plan, x.device, wide=True):
        return conv2d_fused(x, pads, weights, config, plan, groups, k, stride, dilation, out_hw, static, key, stats,
                            channels_last, inside)
    pl, pr, pt, pb = pads
    src = (x.to(torch.bfloat16) if config.bf16_io else x).transpose(0, 1)  # (C, B, H, W) view
    y = torch.empty(bt, cout, ho, wo, dtype=torch.float32, device=x.device,
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # output rows per chunk: bounded by the patches (c*kh*kw per output) and the partial sums (T*cout)
    per_row = wo * max(c * kh * kw, 1)
    rows = max(1, min(_IM2COL_ELEMENTS // per_row, CHUNK_ELEMENTS // max(1, wo * T * cout)))
    chunks = plan_chunks(bt, ho, rows)
    nb, nh = chunks[0][1] - chunks[0][0], chunks[0][3] - chunks[0][2]
    buf = scratch("patches", (c * kh * kw * nb * nh * wo,), torch.float32, x.device)
    # the padded images of one chunk, channels first (the border is zeroed once per call)
    xc = scratch("padded_input", (c, nb, h + pt + pb, w_ + pl + pr), torch.float32, x.device)
    if any(pads):
        xc.zero_()
    (stride_h, stride_w), (dil_h, dil_w) = stride, dilation
    for b0, b1, h0, h1 in chunks:
        b, rows_c = b1 - b0, h1 - h0  # images and output rows of this chunk
        if h0 == 0:
            xc[:, :b, pt : pt + h, pl : pl + w_].copy_(src[:, b0:b1])
        cols = buf[: c * kh * kw * b * rows_c * wo].view(c, kh, kw, b, rows_c, wo)
        # every kernel offset at once: a strided view of the padded images, one copy
        sc, sb, sy, sx_ = xc.stride()
        cols.copy_(xc.as_strided((c, kh, kw, b, rows_c, wo),
                                 (sc, dil_h * sy, dil_w * sx_, sb, stride_h * sy, stride_w * sx_),
                                 xc.storage_offset() + h0 * stride_h * sy))
        yi = analog_gemm_cols(cols.view(groups, (c // groups) * kh * kw, b * rows_c * wo), weights, config, plan,
                              input_scale=static, generator=generator, key=key, p_off=(b0 * ho + h0) * wo,
                              p_total=bt * ho * wo, stats=stats, inside=inside)  # (G, Ng, P)
        y[b0:b1, :, h0:h1].copy_(yi.view(cout, b, rows_c, wo).transpose(0, 1))
    if config.bf16_io:
        y = y.to(torch.bfloat16).to(torch.float32)
    return y


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's shape arguments: ``pads`` (left, right, top, bottom), stride,
    dilation, groups, kernel ``k`` (kh, kw) and output size ``out_hw`` (ho, wo)."""

    pads: tuple[int, int, int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    k: tuple[int, int]
    out_hw: tuple[int, int]


def trains_in_columns(config: ABFPConfig, x: Tensor, w3: Tensor) -> bool:
    """Whether a convolution with gradients takes :func:`_conv2d_train`: uniform (counter) noise
    or none, not the reference kernel, float32 CPU operands and the compiled kernels present
    (else :func:`_conv2d_rows` runs, the reference of this path)."""
    return (TRAIN_IN_COLUMNS and config.kernel != "reference" and (config.noise_std == 0 or config.noise_dist == "uniform")
            and x.dtype == w3.dtype == torch.float32 and x.device.type == "cpu" and fused.usable())


#: :func:`trains_in_columns` may say yes (tests switch it off to compare with :func:`_conv2d_rows`).
TRAIN_IN_COLUMNS = True

#: The column training path's input gradient (ABFP mode) through torch's convolution input
#: gradient on the dequantised weights (:func:`_input_grad`); ``False``: the readable reference,
#: the row path's GEMMs and col2im bit for bit. The same sum in another order: float32 ulps apart.
TORCH_INPUT_GRAD = True


def _conv2d_train(x: Tensor, w3: Tensor, geo: ConvGeometry, weights: Encoded, config: ABFPConfig, input_scale: Any,
                  weight_scale: Any, generator: torch.Generator | None, stats: ProductStats | None,
                  key: int | None) -> Tensor:
    """A convolution with gradients (QAT): the forward is the inference path (:func:`_conv2d_cols`,
    compiled, no float32 patch matrix), under one noise key, so a QAT output equals the
    inference output bit for bit; the backward (:class:`_ConvTraining`) the straight-through
    gradients of :func:`_conv2d_rows` (bit for bit, but for the ABFP input gradient where
    :data:`TORCH_INPUT_GRAD`: float32 ulps), and the output is laid out as that path
    leaves it (:func:`_row_layout`: the layers after it may sum in another order on another
    layout). Where an ADC sample clipped, the backward needs the clamp mask: the forward's
    kernels mark the clipped samples as they go (``inside``, one byte per ADC sample, kept only
    when one clipped), and the backward applies it (:func:`_train_grads`); nothing runs twice."""
    if key is None:
        key = draw_key(config, generator)  # the one draw the convolution makes
    counted = ProductStats()
    layout = _row_layout(x.shape[0], geo.groups, w3.shape[1], geo.out_hw, _im2col_step(x.shape[1], geo.k, geo.out_hw))
    y = _ConvTraining.apply(x, w3, geo, weights, config, input_scale, weight_scale, key, counted, layout)
    if layout == "view":
        y = _product_view(y, geo.groups, x.shape[0], geo.out_hw)
    if stats is not None:
        stats.saturated += counted.saturated
        stats.conversions += counted.conversions
    return y


def _product_view(yp: Tensor, groups: int, bt: int, out_hw: tuple[int, int]) -> Tensor:
    """``(G, B*Ho*Wo, N/G)`` product rows as the ``(B, N, Ho, Wo)`` output, as :func:`_conv2d_rows` reshapes them."""
    ho, wo = out_hw
    ng = yp.shape[2]
    return yp.reshape(groups, bt, ho, wo, ng).permute(1, 0, 4, 2, 3).reshape(bt, groups * ng, ho, wo)


@functools.lru_cache(maxsize=256)
def _row_layout(bt: int, groups: int, ng: int, out_hw: tuple[int, int], step: int) -> str | tuple[int, ...]:
    """The memory layout of :func:`_conv2d_rows`' output, worked out on meta tensors: ``"view"``
    (one chunk whose output is a view of its product's ``(G, B*Ho*Wo, N/G)`` rows),
    ``"contiguous"``, ``"channels_last"`` or the strides (of the reshape's copy, or of the
    ``torch.cat`` over chunks)."""
    outs = []
    for i in range(0, bt, step):
        bi = min(step, bt - i)
        outs.append(_product_view(torch.empty(groups, bi * out_hw[0] * out_hw[1], ng, device="meta"), groups, bi, out_hw))
    if len(outs) == 1 and outs[0]._is_view():
        return "view"
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    if y.is_contiguous():
        return "contiguous"
    if y.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return tuple(y.stride())


class _ConvTraining(torch.autograd.Function):
    """``y`` of :func:`_conv2d_cols` (as the product rows ``(G, B*Ho*Wo, N/G)`` where ``layout``
    is ``"view"``); backward: :func:`_conv2d_rows`' straight-through gradients, the same float32
    operations in the same order (:func:`_train_grads`; the ABFP input gradient in torch's
    order where :data:`TORCH_INPUT_GRAD`). The forward's kernels fill the clamp mask
    ``(G, T, B*Ho*Wo, N/G)`` (True: not clipped), which the backward gets where a sample clipped."""

    @staticmethod
    def forward(ctx, x, w3, geo, weights, config, input_scale, weight_scale, key, counted, layout):  # type: ignore[override]
        ctx.geo, ctx.config, ctx.input_scale, ctx.weight_scale = geo, config, input_scale, weight_scale
        ctx.rows = layout == "view"
        bt, (ho, wo) = x.shape[0], geo.out_hw
        inside = torch.ones(geo.groups, weights.codes.shape[1], bt * ho * wo, w3.shape[1], dtype=torch.bool)
        y = _conv2d_cols(x.detach(), geo.pads, weights, config, geo.groups, geo.k, geo.stride, geo.dilation,
                         geo.out_hw, input_scale, None, counted, channels_last=layout in ("channels_last", "view"),
                         key=key, inside=inside)
        ctx.save_for_backward(x, w3, *([inside] if counted.saturated else []))
        if layout == "view":
            yp = torch.empty(geo.groups, y.shape[0] * y.shape[2] * y.shape[3], w3.shape[1], dtype=y.dtype)
            _product_view(yp, geo.groups, y.shape[0], geo.out_hw).copy_(y)
            return yp
        if isinstance(layout, tuple):
            return torch.empty_strided(y.shape, layout, dtype=y.dtype).copy_(y)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, w3, *inside = ctx.saved_tensors
        with torch.no_grad():
            gx, gw = _train_grads(gy, x.detach(), w3.detach(), ctx.geo, ctx.config, ctx.input_scale, ctx.weight_scale,
                                  ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.rows, inside[0] if inside else None)
        return first_order_only((gx, gw, None, None, None, None, None, None, None, None), gy, x, w3)


#: Where a sample clipped, the fast backward (:data:`TORCH_INPUT_GRAD`, ABFP mode) subtracts the
#: clipped samples' terms (:func:`_clipped_terms`) while they touch at most this share of the
#: patch matrix's elements; beyond it, the masked product over the whole batch.
CLIPPED_TERMS_SHARE = 0.25


def _train_grads(gy: Tensor, x: Tensor, w3: Tensor, geo: ConvGeometry, config: ABFPConfig, input_scale: Any,
                 weight_scale: Any, need_x: bool, need_w: bool, rows: bool = False,
                 inside: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """The straight-through gradients; ``inside``: the ADC clamp mask (G, T, B*Ho*Wo, N/G), True
    where a sample did not clip (``None``: none clipped).

    Where one clipped: with the reference input gradient (or fixed mode, or many clipped
    samples: :data:`CLIPPED_TERMS_SHARE`) the masked product over the whole batch as one im2col
    chunk (:func:`_chunk_grads` with the mask: the gradients of that row product bit for bit,
    as autograd computed them when the convolution ran again as one); else, with one tile per
    product (``K <= n``), the unmasked gradients of ``dY`` times the mask, and with more, the
    unmasked gradients less the clipped samples' terms (:func:`_clipped_terms`): the same sums
    within float32 rounding, in another order."""
    if inside is None:
        return _chunk_grads(gy, x, w3, geo, config, input_scale, weight_scale, need_x, need_w, rows)
    n, kg = config.tile_width, w3.shape[2]
    fast = TORCH_INPUT_GRAD and config.mode == "abfp"
    if fast and inside.shape[1] == 1:  # one tile: the mask is one per output, masking dY is all it takes
        mask = inside[:, 0]
        gm = gy * (mask if rows else _product_view(mask, geo.groups, x.shape[0], geo.out_hw))
        return _chunk_grads(gm, x, w3, geo, config, input_scale, weight_scale, need_x, need_w, rows)
    clipped = int(inside.numel() - inside.sum())
    terms = clipped * min(n, kg) * (2 if need_x and need_w else 1)
    if fast and terms <= CLIPPED_TERMS_SHARE * inside.shape[2] * geo.groups * kg:
        gx, gw = _chunk_grads(gy, x, w3, geo, config, input_scale, weight_scale, need_x, need_w, rows)
        gyr = gy if rows else _output_rows(gy, geo.groups, geo.out_hw)
        dx, dw = _clipped_terms(gyr, x, w3, geo, config, input_scale, weight_scale, inside, need_x, need_w)
        return (None if gx is None else gx.sub_(dx)), (None if gw is None else gw.sub_(dw))
    return _chunk_grads(gy, x, w3, geo, config, input_scale, weight_scale, need_x, need_w, rows, inside)


def _output_rows(gy: Tensor, groups: int, out_hw: tuple[int, int]) -> Tensor:
    """An output gradient (B, N, Ho, Wo) as the product rows (G, B*Ho*Wo, N/G), by the reshapes
    with which autograd takes it back through :func:`_conv2d_rows`' output."""
    bi, (ho, wo) = gy.shape[0], out_hw
    ng = gy.shape[1] // groups
    return gy.reshape(bi, groups, ng, ho, wo).permute(1, 0, 3, 4, 2).reshape(groups, bi * ho * wo, ng)


def _clipped_terms(gyr: Tensor, x: Tensor, w3: Tensor, geo: ConvGeometry, config: ABFPConfig, input_scale: Any,
                   weight_scale: Any, inside: Tensor, need_x: bool, need_w: bool) -> tuple[Tensor | None, Tensor | None]:
    """The terms of the clipped ADC samples in the unmasked straight-through gradients (ABFP
    mode), which the masked ones leave out: for a clipped sample of group ``g``, tile ``t``,
    output position ``p`` and output ``j`` (of ``gyr`` (G, P, N/G)), ``dY[p, j] Wq[j, tile t]``
    in the input gradient, folded back to the input positions that tile's patch values came
    from, and ``dY[p, j] Xq[p, tile t]`` in the weight gradient (``Xq``: the tile's dequantised
    patch values, :func:`abfp.ops.device.dequantised_rows` on the gathered tile: the values the
    row product uses). Returns them as (B, C, H, W) and (G, N/G, K), or ``None`` where not asked."""
    G, T, _, ng = inside.shape
    n, kg = config.tile_width, w3.shape[2]
    width = min(n, kg)
    (kh, kw), (ho, wo), (sh, sw), (dh, dw) = geo.k, geo.out_hw, geo.stride, geo.dilation
    xpad = F.pad(x, geo.pads) if any(geo.pads) else x
    bt, c, hp, wp = xpad.shape
    g, t, p, j = (~inside).nonzero(as_tuple=True)
    vals = gyr[g, p, j].to(torch.float32)  # (S,)
    k = t.unsqueeze(1) * width + torch.arange(width)  # (S, width): the tile's reduction indices
    valid = k < kg
    k = k.clamp(max=kg - 1)
    cl, i, jj = k // (kh * kw), (k // kw) % kh, k % kw
    b, h, w = (p // (ho * wo)).unsqueeze(1), ((p // wo) % ho).unsqueeze(1), (p % wo).unsqueeze(1)
    where = (((b * c + g.unsqueeze(1) * (c // G) + cl) * hp + h * sh + i * dh) * wp + w * sw + jj * dw)
    dx = dw_ = None
    if need_x:
        wq, _ = dequantised_rows(w3, config, weight_scale, config.weight_max_code)  # (G, N/G, K)
        terms = vals.unsqueeze(1) * wq[g.unsqueeze(1), j.unsqueeze(1), k] * valid
        full = torch.zeros(bt * c * hp * wp, dtype=torch.float32).index_add_(0, where.reshape(-1), terms.reshape(-1))
        dx = full.view(bt, c, hp, wp)
        pl, _, pt, _ = geo.pads
        dx = dx[:, :, pt : pt + x.shape[2], pl : pl + x.shape[3]]
    if need_w:
        patch = xpad.reshape(-1)[where] * valid  # (S, width): the tile's patch values, zero past K
        xq, _ = dequantised_rows(patch.unsqueeze(0), config, input_scale, config.input_max_code)
        terms = vals.unsqueeze(1) * xq[0]
        at = ((g * ng + j) * kg).unsqueeze(1) + k
        dw_ = torch.zeros(G * ng * kg, dtype=torch.float32).index_add_(0, at.reshape(-1)[valid.reshape(-1)],
                                                                         terms.reshape(-1)[valid.reshape(-1)])
        dw_ = dw_.view(G, ng, kg).to(w3.dtype)
    return dx, dw_


def _chunk_grads(gy: Tensor, x: Tensor, w3: Tensor, geo: ConvGeometry, config: ABFPConfig, input_scale: Any,
                 weight_scale: Any, need_x: bool, need_w: bool, rows: bool = False,
                 mask: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """The gradients autograd computes through :func:`_conv2d_rows` with no ADC sample clipped,
    bit for bit: per im2col chunk (the last first, as the engine runs them) the chunk's output
    gradient laid out as that path's reshapes leave it, :func:`abfp.ops.device.ste_grads` on the
    chunk's patches, the weight gradients summed in that order, the patch gradients folded back
    by :func:`abfp.numerics.col2im.col2im` (the slices' backward, last offset first) and placed
    as the batch slices, ``F.pad`` and ``permute`` backward place them (memory layout included).
    In ABFP mode with :data:`TORCH_INPUT_GRAD` the input gradient is :func:`_input_grad` instead
    (the same sum in torch's order; the chunks then only give the weight gradient). With the ADC
    clamp ``mask`` (G, T, B*Ho*Wo, N/G): those of the masked row product over the whole batch as
    one chunk (float32 patches, the masked tile products of ``ste_grads``), bit for bit."""
    bt, c = x.shape[0], x.shape[1]
    (ho, wo), G = geo.out_hw, geo.groups
    kg, ng = w3.shape[2], w3.shape[1]
    step = _im2col_step(c, geo.k, geo.out_hw) if mask is None else bt
    gx_torch = None
    if need_x and TORCH_INPUT_GRAD and config.mode == "abfp" and mask is None:
        gx_torch = _input_grad(_product_view(gy, G, bt, geo.out_hw) if rows else gy, x, w3, geo, config, weight_scale)
        if not need_w:
            return gx_torch, None
        need_x = False
    xpad = F.pad(x, geo.pads) if any(geo.pads) else x
    hp, wp = xpad.shape[2], xpad.shape[3]
    starts = list(range(0, bt, step))
    fused_patches = (mask is None and config.mode == "abfp" and config.scale_dtype in ("bfloat16", "float32")
                     and dequant.usable(x))
    # every chunk x[i : i + step] is a slice (even of the whole batch): its backward copies into zeros (NCHW)
    gxpad = torch.empty(bt, c, hp, wp, dtype=torch.float32) if need_x else None
    gw = None
    for i in reversed(starts):
        xi = xpad[i : i + step]
        bi = xi.shape[0]
        if fused_patches:  # the dequantised patches straight from the input (the same values)
            cols = dequant.dequantise_patches(xi, G, geo.k, geo.stride, geo.dilation, geo.out_hw, config.tile_width,
                                              config.scale_dtype, config.input_max_code,
                                              scratch("ste_xq", (G, bi * ho * wo, kg), torch.float32, x.device))
        else:
            buf = scratch("train_patches", (bi, ho, wo, c, geo.k[0] * geo.k[1]), torch.float32, x.device)
            cols = _im2col(xi, geo.k[0], geo.k[1], geo.stride, geo.dilation, ho, wo, buf).reshape(bi * ho * wo, G, kg).permute(1, 0, 2)
        if rows:  # gy is the gradient of the product rows (G, B*Ho*Wo, N/G) themselves (one chunk)
            gyi = gy
        else:
            gyi = gy[i : i + step] if len(starts) > 1 else gy
            gyi = _output_rows(gyi, G, geo.out_hw)
        gxi, gwi = ste_grads(gyi, cols, w3, mask, config, input_scale, weight_scale, need_x, need_w,
                             in_scratch=mask is None, x_dequantised=fused_patches)
        if gwi is not None:
            gw = gwi if gw is None else gw + gwi
        if gxpad is not None:
            g5 = gxi.permute(1, 0, 2).reshape(bi, ho, wo, c, geo.k[0] * geo.k[1])
            gxpad[i : i + bi].copy_(col2im(g5, (hp, wp), geo.k, geo.stride, geo.dilation).permute(0, 3, 1, 2))
    if gxpad is not None and len(starts) > 1:
        gxpad.add_(0.0)  # every chunk's zeros were added to the others' (a -0.0 becomes +0.0)
    gx = gx_torch
    if gxpad is not None:
        gx = torch.constant_pad_nd(gxpad, [-p for p in geo.pads]) if any(geo.pads) else gxpad
    return gx, gw


def _input_grad(gy: Tensor, x: Tensor, w3: Tensor, geo: ConvGeometry, config: ABFPConfig,
                weight_scale: Any) -> Tensor:
    """The straight-through input gradient of an ABFP convolution with no ADC sample clipped,
    ``dX = col2im(dY_rows @ Wq)`` (:func:`abfp.ops.device.ste_grads`, no DAC mask in ABFP mode),
    as torch's convolution input gradient on the dequantised weights ``Wq`` (one
    ``aten.convolution_backward``, its own kernels: the same float32 sum in another order).
    ``gy``: (B, N, Ho, Wo). Asymmetric padding: the gradient of the padded input, cropped."""
    wq, _ = dequantised_rows(w3, config, weight_scale, config.weight_max_code)  # (G, N/G, K), unfold order
    cout = w3.shape[0] * w3.shape[1]
    wq4 = wq.reshape(cout, x.shape[1] // geo.groups, *geo.k)
    pl, pr, pt, pb = geo.pads
    symmetric = pl == pr and pt == pb
    src = x if symmetric else F.pad(x, geo.pads)
    gx = torch.ops.aten.convolution_backward(gy.to(torch.float32), src, wq4, None, list(geo.stride),
                                             [pt, pl] if symmetric else [0, 0], list(geo.dilation), False, [0, 0],
                                             geo.groups, [True, False, False])[0]
    if symmetric:
        return gx
    return gx[:, :, pt : pt + x.shape[2], pl : pl + x.shape[3]]


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


# ----------------------------------------------------------------------------- handlers
def conv_args(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
              dilation: Any = 1, groups: int = 1) -> tuple[Tensor, Tensor, Tensor | None, Any, Any, Any, int]:
    """``F.conv1d/2d/3d``'s arguments, positional or by keyword:
    ``(input, weight, bias, stride, padding, dilation, groups)``."""
    return input, weight, bias, stride, padding, dilation, groups


def answer_conv(fn: Callable[..., Tensor]) -> Callable[[Frame, Callable, tuple, dict], Any]:
    """The handler of ``torch.conv{1,2}d`` computing with ``fn`` (:func:`conv1d` or :func:`conv2d`)."""

    def handler(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Any:
        x, w, b, stride, padding, dilation, groups = conv_args(*args, **kwargs)
        k = w[0].numel()  # reduction length per group: C_in/groups * kernel size

        def analog(c, s, stats, g):
            return fn(x, w, b, stride, padding, dilation, groups, config=c, input_scale=s[0], generator=g, stats=stats)

        # MACs: every output element is one dot product of length k
        return run_product(frame, "conv", func, args, kwargs, analog, (x, w), k, lambda y: y.numel() * k)

    return handler


register(torch.conv2d)(answer_conv(conv2d))
register(torch.conv1d)(answer_conv(conv1d))


def _conv_tbc_args(input: Tensor, weight: Tensor, bias: Tensor, pad: int = 0) -> tuple[Tensor, Tensor, Tensor, int]:
    return input, weight, bias, pad


@register(torch.conv_tbc)
def answer_conv_tbc(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Any:
    """``torch.conv_tbc(x, w, b, pad)`` (fairseq's ``ConvTBC``: time, batch, channels) is the 1-D
    convolution ``y[t, b, o] = b[o] + sum_{c, j} x[t + j - pad, b, c] w[j, c, o]``, i.e.
    :func:`conv1d` of ``x`` as ``(B, C_in, T)`` and ``w`` as ``(C_out, C_in, k)`` with ``padding=pad``,
    its result as ``(T', B, C_out)``: on the device with conv1d's reduction axis ``(c, j)``."""
    x, w, b, pad = _conv_tbc_args(*args, **kwargs)
    if x.dim() != 3 or w.dim() != 3 or x.shape[2] != w.shape[1]:
        return func(*args, **kwargs)  # torch raises its own error
    xc, wc = x.permute(1, 2, 0), w.permute(2, 1, 0)
    k = wc[0].numel()

    def analog(c, s, stats, g):
        return conv1d(xc, wc, b, 1, pad, 1, 1, config=c, input_scale=s[0], generator=g, stats=stats).permute(2, 0, 1)

    return run_product(frame, "conv", func, args, kwargs, analog, (xc, wc), k, lambda y: y.numel() * k)


_pair = int_pair  # its old name (abfp.functional._pair)
