"""3-D and transposed convolutions on the device (SPEC.md section 3.1).

``conv3d``: im2col, the reduction axis ``C_in/groups * k_d * k_h * k_w`` in ``unfold`` order
``(c, i, j, l)``. It is computed by the 2-D device convolution: for every output depth ``d``
the ``k_d`` input depth slices it reads become extra channels,

    x2[b * D_o + d, c * k_d + i, h, w] = x_pad[b, c, d * s_d + i * dil_d, h, w],

so channel ``c' = c * k_d + i`` keeps the ``unfold`` order ``(c, i, j, l)`` (and keeps each
group's channels contiguous), and the weight is viewed as ``(C_out, C_in/groups * k_d, k_h, k_w)``
(the same reduction rows). The 2-D product's rows are the output positions
``(b, d, h, w)`` in row-major order: exactly the conv3d im2col product, so its numbers and its
counter-based noise index are those of the 3-D product.

``conv_transpose1d/2d/3d``: as a device computes a deconvolution, one analog product per
input position and group,

    P[b, p, (k, o)] = sum_{c in group} x[b, c, p] W[c, o, k]     (reduction over C_in/groups),

a linear product with rows ``b, p``, ``N = C_out/groups * prod(kernel)`` columns, tiled along
``C_in/groups``; then the digital overlap-add (col2im, float32) of ``P`` into the output,

    y[b, g C_out/g + o, q] = sum_{p, k : q = p * s + k * dil - pad} P_g[b, p, (k, o)],

cropped to ``(L_in - 1) s - 2 pad + dil (k - 1) + output_padding + 1`` per axis, then the bias.

The handlers registered here answer ``torch.conv3d`` and ``torch.conv_transpose1d/2d/3d``
inside converted modules; each product goes through :func:`abfp.ops.site.run_product`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ABFPConfig
from ..numerics import ProductStats, encode_weights
from .conv import _conv2d_cols, _conv2d_rows, conv2d, conv_args
from .device import (WEIGHT_CACHE, NotTraceable, WeightCache, bf16, check_finite, generator_for, product, tracing,
                     without_bf16_io)
from .registry import register

__all__ = ["conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"]


# --------------------------------------------------------------------------- argument helpers
def _tuple(v: int | Sequence[int], nd: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    t = tuple(int(a) for a in v)
    if len(t) == 1:
        return t * nd
    if len(t) != nd:
        raise ValueError(f"{name} must be an int or {nd} ints, got {v!r}")
    return t


def _check_operands(x: Tensor, weight: Tensor, bias: Tensor | None, cache: bool, op: str, nd: int,
                    stats: ProductStats | None) -> bool:
    """Finite, well-shaped operands; returns whether the input is unbatched. Under a tracer the
    input and weight are checked inside the custom operators (:mod:`abfp.ops.custom`) and the
    bias by an asynchronous assert in the graph; ADC statistics cannot be traced."""
    if tracing():
        if stats is not None:
            raise NotTraceable(f"{op} with ADC statistics (abfp.summary recording) cannot be traced")
        if bias is not None:
            torch._assert_async(torch.isfinite(bias).all(), "bias contains NaN or Inf; the analog device cannot encode it")
    else:
        check_finite(x, "input")
        if not cache:
            check_finite(weight, "weight")
        if bias is not None:
            check_finite(bias, "bias")
    if weight.dim() != nd + 2 or x.dim() not in (nd + 1, nd + 2):
        raise ValueError(f"{op} needs a {nd + 2}-D (or unbatched {nd + 1}-D) input and a {nd + 2}-D weight, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    return x.dim() == nd + 1


class _LayoutCache(WeightCache):
    """The weight cache of one weight layout: shares :data:`abfp.functional.WEIGHT_CACHE`'s
    storage (so :func:`abfp.functional.clear_cache` clears it too), with keys of its own, so a
    tensor used by a convolution and a transposed convolution (tied weights) keeps both encodings."""

    def __init__(self, tag: str, shared: WeightCache) -> None:
        super().__init__(shared.capacity)
        self._d = shared._d
        self._lock = shared._lock
        self._tag = tag

    def _key(self, w: Tensor, cfg: ABFPConfig, weight_scale: Any) -> tuple | None:  # type: ignore[override]
        k = WeightCache._key(w, cfg, weight_scale)
        return None if k is None else ((self._tag, k[0]),) + k[1:]


_TRANSPOSED_CACHE = _LayoutCache("conv_transpose", WEIGHT_CACHE)


def _encoded(cache: WeightCache, weight: Tensor, w3: Tensor, config: ABFPConfig, weight_scale: Any, use: bool):
    return cache.get(weight, w3, config, weight_scale) if use else None


# --------------------------------------------------------------------------- conv3d
def _resolve_padding(padding: int | Sequence[int] | str, nd: int, kernel: tuple[int, ...],
                     stride: tuple[int, ...], dilation: tuple[int, ...], op: str) -> list[tuple[int, int]]:
    """(low, high) zero padding per spatial axis; 'same' puts the odd pixel at the end, as torch."""
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"{op}: padding='same' is not supported for strided convolutions")
            tot = [d * (k - 1) for d, k in zip(dilation, kernel)]
            return [(t // 2, t - t // 2) for t in tot]
        raise ValueError(f"{op}: unknown padding {padding!r} (use 'same', 'valid', an int or {nd} ints)")
    p = _tuple(padding, nd, "padding")
    if any(v < 0 for v in p):
        raise ValueError(f"{op}: padding must be non-negative, got {padding!r}")
    return [(v, v) for v in p]


def conv3d(
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
    """``F.conv3d`` on the device, as im2col: ``y[b, o, d, h, w] = sum_t ADC(...)`` over the
    tiles of the reduction axis ``C_in/groups * k_d * k_h * k_w`` in ``unfold`` order
    ``(c, i, j, l)``, one product per group (SPEC 3.1), plus the bias (digital, float32).

    Computed by the 2-D device convolution on the depth slices gathered as channels
    ``c * k_d + i`` (see the module docstring): the same numbers, and the fast compiled path.
    Weight encodings are cached per weight value (``cache=False`` re-encodes every call).
    """
    unbatched = _check_operands(x, weight, bias, cache, "conv3d", 3, stats)
    if unbatched:
        x = x.unsqueeze(0)
    out_dtype = x.dtype
    bt, c, d_in, h_in, w_in = x.shape
    cout, cg, kd, kh, kw = weight.shape
    if groups < 1 or c != cg * groups or cout % groups:
        raise ValueError(f"conv3d: input has {c} channels, weight expects {cg} x groups={groups} "
                         f"and {cout} output channels divisible by groups")
    stride3, dil3 = _tuple(stride, 3, "stride"), _tuple(dilation, 3, "dilation")
    if any(s < 1 for s in stride3) or any(d < 1 for d in dil3):
        raise ValueError(f"conv3d: stride and dilation must be positive, got {stride!r} and {dilation!r}")
    pads = _resolve_padding(padding, 3, (kd, kh, kw), stride3, dil3, "conv3d")
    padded = [n + lo + hi for n, (lo, hi) in zip((d_in, h_in, w_in), pads)]
    do, ho, wo = ((p - dl * (k - 1) - 1) // s + 1 for p, dl, k, s in zip(padded, dil3, (kd, kh, kw), stride3))
    if do <= 0 or ho <= 0 or wo <= 0:
        raise ValueError("conv3d: the kernel is larger than the (padded) input")
    (stride_d, stride_h, stride_w), (dd, dh, dw) = stride3, dil3
    kg = cg * kd * kh * kw
    w3 = weight.reshape(groups, cout // groups, kg)  # rows in unfold order (c, i, j, l)
    traced = tracing()
    weights = None if traced else _encoded(WEIGHT_CACHE, weight, w3, config, weight_scale, cache)
    device = config
    if config.bf16_io and bias is not None:
        # as conv2d: round the inputs here and the output after the bias (not before it)
        device, x, w3 = without_bf16_io(config), bf16(x), bf16(w3)
    # depth slices as channels: x2[b*Do + d, c*kd + i] = xpad[b, c, d*stride_d + i*dd]
    xd = F.pad(x, (0, 0, 0, 0, *pads[0])) if any(pads[0]) else x
    span = stride_d * (do - 1) + 1
    x2 = torch.stack([xd[:, :, i * dd : i * dd + span : stride_d] for i in range(kd)], dim=2)  # (B, C, kd, Do, H, W)
    x2 = x2.permute(0, 3, 1, 2, 4, 5).reshape(bt * do, c * kd, h_in, w_in)
    pads_hw = (pads[2][0], pads[2][1], pads[1][0], pads[1][1])
    channels_last = _channels_last_3d(x) or _channels_last_3d(weight)
    if traced:
        y2 = _conv3d_traced(x2, weight, bias, config, groups, pads_hw, (stride_h, stride_w), (dh, dw),
                            input_scale, weight_scale, generator, cache, _reads_every_depth(d_in, pads[0], kd, dd, stride_d))
    else:
        if config.mode == "fixed" and input_scale is None:
            input_scale = x.detach().abs().max() if x.numel() else 0.0  # one scale for the whole tensor
        if config.kernel != "reference" and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            if weights is None:
                weights = encode_weights(w3.detach().to(torch.bfloat16) if device.bf16_io else w3.detach(), device,
                                         weight_scale)
            y2 = _conv2d_cols(x2, pads_hw, weights, device, groups, (kh, kw), (stride_h, stride_w), (dh, dw),
                              (ho, wo), input_scale, generator_for(config, generator, x.device), stats,
                              channels_last=channels_last)
        else:
            xp = F.pad(x2, pads_hw) if any(pads_hw) else x2
            y2 = _conv2d_rows(xp, w3, weights, device, groups, (kh, kw), (stride_h, stride_w), (dh, dw), (ho, wo),
                              input_scale, weight_scale, generator, stats)
        if bias is not None:
            y2.add_(bias.to(torch.float32).view(1, -1, 1, 1))  # y2 is this call's own tensor
            if config.bf16_io:
                y2 = bf16(y2)
    # (B*Do, Cout, Ho, Wo) -> (B, Cout, Do, Ho, Wo): channels-last 2-D output is channels-last 3-D here
    y = y2.unflatten(0, (bt, do)).transpose(1, 2)
    y = y.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    if unbatched:
        y = y.squeeze(0)
    return y.to(out_dtype)


def _reads_every_depth(d_in: int, pad: tuple[int, int], kd: int, dd: int, stride_d: int) -> bool:
    """Whether the gathered depth slices hold every input depth (else a stride skips some)."""
    read = {d * stride_d + i * dd - pad[0] for i in range(kd) for d in range((d_in + sum(pad) - dd * (kd - 1) - 1) // stride_d + 1)}
    return read.issuperset(range(d_in))


def _conv3d_traced(x2: Tensor, weight: Tensor, bias: Tensor | None, config: ABFPConfig, groups: int, pads_hw: tuple[int, int, int, int], stride: tuple[int, int],
                   dilation: tuple[int, int], input_scale: Any, weight_scale: Any,
                   generator: torch.Generator | None, cache: bool, reads_all: bool) -> Tensor:
    """:func:`conv3d` under a tracer: the 2-D device convolution of the gathered depth slices
    (:func:`abfp.ops.conv.conv2d`, i.e. the custom operator ``abfp::conv2d``, or ``abfp::device``
    on the patches with gradients), so the same numbers as eager; bias and bfloat16 output in
    the graph."""
    if config.mode == "fixed" and input_scale is None and not reads_all:
        raise NotTraceable("a fixed-point conv3d whose depth stride skips input slices needs a static input_scale "
                           "to be traced (its dynamic scale is max |x| over slices the graph does not read): "
                           "calibrate the model (abfp.calibrate) or pass input_scale")
    cout, cg, kd, kh, kw = weight.shape
    w2 = weight.reshape(cout, cg * kd, kh, kw)
    xp = F.pad(x2, pads_hw) if any(pads_hw) else x2
    # conv2d rounds the inputs itself when it has a bias: hand it the config the caller holds
    return conv2d(xp, w2, bias, stride, 0, dilation, groups, config=config, input_scale=input_scale,
                  weight_scale=weight_scale, generator=generator, cache=cache)


def _channels_last_3d(t: Tensor) -> bool:
    """``t`` is channels-last 3-D (and not also plain contiguous): ``F.conv3d``'s rule for its output."""
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()


# --------------------------------------------------------------------------- transposed
def _transposed_geometry(x: Tensor, weight: Tensor, nd: int, stride, padding, output_padding, groups: int,
                         dilation) -> tuple[tuple[int, ...], ...]:
    op = f"conv_transpose{nd}d"
    if isinstance(padding, str):
        raise ValueError(f"{op}: padding must be an int or {nd} ints (torch has no string padding here), got {padding!r}")
    s, p = _tuple(stride, nd, "stride"), _tuple(padding, nd, "padding")
    op_, d = _tuple(output_padding, nd, "output_padding"), _tuple(dilation, nd, "dilation")
    if any(v < 1 for v in s + d) or any(v < 0 for v in p + op_):
        raise ValueError(f"{op}: stride and dilation must be positive, padding and output_padding non-negative")
    for a in range(nd):
        if op_[a] >= s[a] and op_[a] >= d[a]:
            raise ValueError(f"{op}: output_padding ({op_[a]}) must be smaller than either stride ({s[a]}) "
                             f"or dilation ({d[a]})")
    cin = x.shape[1]
    if groups < 1 or cin != weight.shape[0] or cin % groups:
        raise ValueError(f"{op}: input has {cin} channels, weight has {weight.shape[0]} input channels "
                         f"(must be equal and divisible by groups={groups})")
    k = tuple(int(v) for v in weight.shape[2:])
    out = tuple((n - 1) * s[a] - 2 * p[a] + d[a] * (k[a] - 1) + op_[a] + 1 for a, n in enumerate(x.shape[2:]))
    if any(v <= 0 for v in out):
        raise ValueError(f"{op}: the output would be empty (size {out}); reduce the padding")
    return s, p, op_, d, k, out


def _overlap_add(cols: Tensor, out: Tensor, sp_in: tuple[int, ...], k: tuple[int, ...], s: tuple[int, ...],
                 p: tuple[int, ...], d: tuple[int, ...]) -> None:
    """col2im in float32, channels last: ``out[b, q, :] += cols[b, p_in, kk, :]`` for
    ``q = p_in s + kk d - pad`` inside ``out``. ``cols``: (B, *sp_in, *k, C); ``out``:
    (B, *sp_out, C). One strided add of contiguous channel rows per kernel offset, kernel
    offsets in ``unfold`` order."""
    nd = len(sp_in)
    sp_out = out.shape[1 : 1 + nd]
    for kk in itertools.product(*(range(v) for v in k)):
        src, dst = [], []
        for a in range(nd):
            off = kk[a] * d[a] - p[a]  # output position of input position 0
            lo = max(0, -(off // s[a]))  # first input position landing at q >= 0: ceil(-off / s)
            hi = min(sp_in[a], (sp_out[a] - 1 - off) // s[a] + 1)  # one past the last landing at q < out
            if hi <= lo:
                break
            src.append(slice(lo, hi))
            q0 = off + lo * s[a]
            dst.append(slice(q0, q0 + s[a] * (hi - lo - 1) + 1, s[a]))
        else:
            out[(slice(None), *dst)] += cols[(slice(None), *src, *kk)]


def conv_transpose_nd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    output_padding: int | Sequence[int],
    groups: int,
    dilation: int | Sequence[int],
    nd: int,
    *,
    config: ABFPConfig,
    input_scale: float | Tensor | None = None,
    weight_scale: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    stats: ProductStats | None = None,
    cache: bool = True,
) -> Tensor:
    """The transposed convolution of ``nd`` spatial axes on the device (see the module docstring)."""
    op = f"conv_transpose{nd}d"
    unbatched = _check_operands(x, weight, bias, cache, op, nd, stats)
    if unbatched:
        x = x.unsqueeze(0)
    out_dtype = x.dtype
    s, p, _, d, k, sp_out = _transposed_geometry(x, weight, nd, stride, padding, output_padding, groups, dilation)
    bt, cin = x.shape[0], x.shape[1]
    sp_in = tuple(x.shape[2:])
    L, kvol = math.prod(sp_in), math.prod(k)
    cg, cout_g = cin // groups, weight.shape[1]
    n_cols = cout_g * kvol
    # one product per input position and group: rows (b, p), reduction over C_in/groups, columns
    # (kernel offset, o): each offset's outputs are contiguous channel rows for the overlap-add
    x3 = x.reshape(bt, groups, cg, L).permute(1, 0, 3, 2).reshape(groups, bt * L, cg)
    w3 = weight.reshape(groups, cg, cout_g, kvol).permute(0, 3, 2, 1).reshape(groups, n_cols, cg)
    # under a tracer the weight is encoded inside the custom operator, per call (w3 is made in the graph)
    weights = None if tracing() else _encoded(_TRANSPOSED_CACHE, weight, w3, config, weight_scale, cache)
    device = config
    if config.bf16_io:
        # the layer's output is the overlap-add of many products: round the inputs here and the
        # output once, after the overlap-add and the bias (as conv2d with a bias)
        device, x3, w3 = without_bf16_io(config), bf16(x3), bf16(w3)
    y3 = product(x3, w3, device, input_scale=input_scale, weight_scale=weight_scale, generator=generator,
                 weights=weights, stats=stats)  # (G, B*L, kvol * C_out/g) float32
    # col2im, channels last: (G, B, *sp_in, *k, C_out/g) -> (B, *sp_in, *k, G, C_out/g)
    cols = y3.view(groups, bt, *sp_in, *k, cout_g)
    cols = cols.squeeze(0) if groups == 1 else cols.movedim(0, -2).reshape(bt, *sp_in, *k, groups * cout_g)
    y = torch.zeros(bt, *sp_out, groups * cout_g, dtype=torch.float32, device=x.device)
    _overlap_add(cols, y, sp_in, k, s, p, d)
    if bias is not None:
        y.add_(bias.to(torch.float32))  # y is this call's own tensor
    if config.bf16_io:
        y = bf16(y)
    y = y.movedim(-1, 1)  # (B, C_out, *sp_out): channels-last memory (2-D, 3-D) as the products came
    if nd == 1:
        y = y.contiguous()
    if unbatched:
        y = y.squeeze(0)
    return y.to(out_dtype)


def _transposed_doc(nd: int) -> str:
    return (
        f"``F.conv_transpose{nd}d`` on the device (SPEC 3.1): one analog product per input position and group,\n"
        f"    ``P[b, p, (k, o)] = sum_c x[b, c, p] W[c, o, k]`` over the ``C_in/groups`` channels of the group\n"
        f"    (tiled along ``C_in/groups``; ``N = C_out/groups * prod(kernel)`` outputs per row), then the\n"
        f"    digital overlap-add ``y[b, o, q] = sum_{{p, k: q = p*stride + k*dilation - padding}} P[b, p, (k, o)]``\n"
        f"    (float32) into an output of size ``(L_in - 1) stride - 2 padding + dilation (k - 1) +\n"
        f"    output_padding + 1`` per axis, then the bias. Arguments as torch's; weight encodings cached per value."
    )


def conv_transpose1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | Sequence[int] = 1,
                     padding: int | Sequence[int] = 0, output_padding: int | Sequence[int] = 0, groups: int = 1,
                     dilation: int | Sequence[int] = 1, **kw: Any) -> Tensor:
    return conv_transpose_nd(x, weight, bias, stride, padding, output_padding, groups, dilation, 1, **kw)


def conv_transpose2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | Sequence[int] = 1,
                     padding: int | Sequence[int] = 0, output_padding: int | Sequence[int] = 0, groups: int = 1,
                     dilation: int | Sequence[int] = 1, **kw: Any) -> Tensor:
    return conv_transpose_nd(x, weight, bias, stride, padding, output_padding, groups, dilation, 2, **kw)


def conv_transpose3d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | Sequence[int] = 1,
                     padding: int | Sequence[int] = 0, output_padding: int | Sequence[int] = 0, groups: int = 1,
                     dilation: int | Sequence[int] = 1, **kw: Any) -> Tensor:
    return conv_transpose_nd(x, weight, bias, stride, padding, output_padding, groups, dilation, 3, **kw)


for _nd, _f in ((1, conv_transpose1d), (2, conv_transpose2d), (3, conv_transpose3d)):
    _f.__doc__ = _transposed_doc(_nd) + "\n\n    Keywords: ``config`` (required), ``input_scale``, ``weight_scale``, ``generator``, ``stats``, ``cache``."


# --------------------------------------------------------------------------- handlers
def _transposed_args(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return input, weight, bias, stride, padding, output_padding, groups, dilation


@register(torch.conv3d)
def answer_conv3d(frame, func, args, kwargs):
    from ..nn.mode import run_product

    x, w, b, stride, padding, dilation, groups = conv_args(*args, **kwargs)
    k = w[0].numel()  # reduction length per group: C_in/groups * k_d * k_h * k_w

    def analog(c, s, stats, g):
        return conv3d(x, w, b, stride, padding, dilation, groups, config=c, input_scale=s[0], generator=g, stats=stats)

    return run_product(frame, "conv", func, args, kwargs, analog, (x, w), k, lambda y: y.numel() * k)


def device_matrix(weight: Tensor, groups: int) -> Tensor:
    """A transposed convolution's weight as the device holds it: the grouped 1x1 convolution
    weight ``(C_out * prod(kernel), C_in/groups, 1, ...)``, rows ``(group, k, o)``.
    ``summary`` and the energy model read the product's shape from it (and calibration its values)."""
    nd = weight.dim() - 2
    cg, cout_g = weight.shape[0] // groups, weight.shape[1]
    w = weight.reshape(groups, cg, cout_g, -1).permute(0, 3, 2, 1)
    return w.reshape(-1, cg, *([1] * nd))


def answer_conv_transpose(nd: int):
    fn = {1: conv_transpose1d, 2: conv_transpose2d, 3: conv_transpose3d}[nd]

    def handler(frame, func, args, kwargs):
        from ..nn.mode import run_product

        x, w, b, stride, padding, output_padding, groups, dilation = _transposed_args(*args, **kwargs)
        k = w.shape[0] // groups  # reduction length of each product: C_in/groups

        def analog(c, s, stats, g):
            return fn(x, w, b, stride, padding, output_padding, groups, dilation,
                      config=c, input_scale=s[0], generator=g, stats=stats)

        # MACs: every input position (x.numel() counts them times C_in) times C_out/g * prod(kernel)
        macs = x.numel() * w[0].numel()
        return run_product(frame, "conv", func, args, kwargs, analog, (x, device_matrix(w, groups)), k,
                           lambda y: macs)

    return handler


register(torch.conv_transpose1d)(answer_conv_transpose(1))
register(torch.conv_transpose2d)(answer_conv_transpose(2))
register(torch.conv_transpose3d)(answer_conv_transpose(3))
