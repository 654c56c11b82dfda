"""Routing products to the device while a converted module runs.

Every module of a converted model gets a forward pre-hook that pushes ``(module name,
state)`` on a thread-local stack (the first one also enters :class:`AnalogMode`, a
``TorchFunctionMode``) and a forward hook that pops it. While the mode is active, the
functional calls that modules make (``F.linear``, ``F.conv1d/2d``, ``torch.matmul``,
``@``, ``bmm``, ``mm``, ``baddbmm``, ``einsum``, ``F.scaled_dot_product_attention``,
``F.multi_head_attention_forward``) are answered by :mod:`abfp.functional` with the config
of the innermost running module. Intercepting the call rather than replacing the module
keeps subclasses that pad inside their own ``forward`` working.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .. import functional as AF
from ..config import ABFPConfig
from ..numerics import ProductStats
from ..numerics.blocks import num_tiles
from ..ops.registry import handler_for, register
from .state import AnalogState, SiteRecord

_tls = threading.local()


def _stack() -> list[list[Any]]:
    s = getattr(_tls, "stack", None)
    if s is None:
        s = _tls.stack = []
    return s


class Frame:
    """One running converted module: its name, its state, and its per-kind product counter."""

    __slots__ = ("name", "state", "counts", "mode")

    def __init__(self, name: str, state: AnalogState) -> None:
        self.name = name
        self.state = state
        self.counts: dict[str, int] = {}
        self.mode: AnalogMode | None = None

    def site(self, op: str) -> str:
        i = self.counts.get(op, 0)
        self.counts[op] = i + 1
        return f"{self.name}:{op}{i}"


class EnterHook:
    """Forward pre-hook of a converted module."""

    def __init__(self, name: str, state: AnalogState) -> None:
        self.name = name
        self.state = state

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        stack = _stack()
        frame = Frame(self.name, self.state)
        if not any(f.mode is not None for f in stack):
            frame.mode = AnalogMode()
            frame.mode.__enter__()
        stack.append(frame)


class ExitHook:
    """Forward hook of a converted module (runs also when forward raises)."""

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        stack = _stack()
        if stack:
            frame = stack.pop()
            if frame.mode is not None:
                frame.mode.__exit__(None, None, None)


@dataclass
class ProductCall:
    """One analog product as an interceptor sees it (see ``AnalogState.interceptors``).

    ``operands``: (input, weight) for linear/conv (the raw conv input and 4-D weight),
    (a, b) for matmul. ``analog()`` computes it on the device with ``config`` (or another
    config passed as argument); ``digital()`` computes it in float32 exactly as the model
    asked (with autograd). ``call`` is ``(func, args, kwargs)`` of the intercepted call.
    """

    site: str
    kind: str
    config: ABFPConfig
    operands: tuple[Tensor, ...]
    analog: Callable[..., Tensor]
    digital: Callable[[], Tensor]
    call: tuple[Any, tuple, dict]


def _record(frame: Frame, site: str, kind: str, cfg: ABFPConfig, x_shape, w_shape, k: int, macs: int,
            stats: ProductStats, y: Tensor, y_ref: Tensor | None) -> None:
    rec = frame.state.records.get(site)
    if rec is None:
        rec = frame.state.records[site] = SiteRecord(site=site, kind=kind, config=cfg)
    rec.x_shape, rec.w_shape = tuple(x_shape), tuple(w_shape)
    rec.tiles = num_tiles(k, cfg.tile_width)
    rec.calls += 1
    rec.macs += macs
    rec.adc_conversions += stats.conversions
    rec.saturated += stats.saturated
    if y_ref is not None:
        yr = y_ref.detach().double()
        rec.err_sq += float(((y.detach().double() - yr) ** 2).sum())
        rec.ref_sq += float((yr**2).sum())


def _calibrate(state: AnalogState, site: str, *operands: Tensor) -> None:
    vals = []
    for t in operands:
        a = t.detach().abs().flatten().float()
        if a.numel() == 0:
            vals.append(0.0)
        elif state.calibration_percentile >= 100.0:
            vals.append(float(a.max()))
        else:
            k = max(1, min(a.numel(), math.ceil(a.numel() * state.calibration_percentile / 100.0)))
            vals.append(float(a.kthvalue(k).values))
    old = state.input_scales.get(site)
    state.input_scales[site] = vals if old is None else [max(o, v) for o, v in zip(old, vals)]


def _scales(state: AnalogState, cfg: ABFPConfig, site: str) -> list[float | None]:
    if cfg.mode != "fixed":
        return [None, None]
    s = state.input_scales.get(site)
    return [None, None] if s is None else list(s) + [None] * (2 - len(s))


def run_product(frame: Frame, op: str, func: Callable, args: tuple, kwargs: dict,
         analog: Callable[[ABFPConfig, list, ProductStats | None, torch.Generator | None], Tensor],
         operands: tuple[Tensor, ...], k: int, macs: Callable[[Tensor], int], *, site: str | None = None) -> Any:
    """Common path of every product: calibration, interceptors, recording, the device call.

    ``analog(config, static_scales, stats, generator)`` computes the product on the device;
    ``func(*args, **kwargs)`` is the float32 call it replaces (used while calibrating, by
    interceptors as ``digital()``, and as the reference while recording); ``operands`` are
    the two matrices of the product (input first), ``k`` its reduction length and
    ``macs(y)`` its multiply-accumulate count given its output. ``site``: an explicit site
    name (default: ``frame.site(op)``, counting the products of kind ``op`` in this call).
    """
    state = frame.state
    cfg = state.config_for(frame.name)
    site = frame.site(op) if site is None else site
    if state.calibrating:
        _calibrate(state, site, *operands)
        return func(*args, **kwargs)
    interceptor = state.interceptors.get(site) or state.interceptors.get("*")
    if interceptor is not None:
        return interceptor(ProductCall(
            site=site, kind=op, config=cfg, operands=operands,
            analog=lambda c=cfg: analog(c, _scales(state, c, site), None, state.generator(c, operands[0].device)),
            digital=lambda: func(*args, **kwargs),
            call=(func, args, kwargs),
        ))
    stats = ProductStats() if state.recording else None
    y = analog(cfg, _scales(state, cfg, site), stats, state.generator(cfg, operands[0].device))
    if state.recording:
        with torch.no_grad():
            y_ref = func(*args, **kwargs)
        _record(frame, site, op, cfg, operands[0].shape, operands[1].shape, k, macs(y), stats, y, y_ref)  # type: ignore[arg-type]
    return y


# ----------------------------------------------------------------------------- handlers
def _h_linear(frame, func, args, kwargs):
    def f(input, weight, bias=None):
        return input, weight, bias
    x, w, b = f(*args, **kwargs)
    m = x.numel() // max(1, x.shape[-1])
    return run_product(frame, "linear", func, args, kwargs,
                lambda c, s, st, g: AF.linear(x, w, b, config=c, input_scale=s[0], generator=g, stats=st),
                (x, w), w.shape[1], lambda y: m * w.shape[0] * w.shape[1])


def _conv_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return input, weight, bias, stride, padding, dilation, groups


def _h_conv(op: str, fn: Callable):
    def handler(frame, func, args, kwargs):
        x, w, b, stride, padding, dilation, groups = _conv_args(*args, **kwargs)
        k = w[0].numel()  # reduction length per group: C_in/groups * kernel size

        def analog(c, s, st, g):
            return fn(x, w, b, stride, padding, dilation, groups, config=c, input_scale=s[0], generator=g, stats=st)

        # MACs: every output element is one dot product of length k
        return run_product(frame, op, func, args, kwargs, analog, (x, w), k, lambda y: y.numel() * k)
    return handler


def _h_matmul(frame, func, args, kwargs):
    a, b = args[0], args[1]
    if not frame.state.include_matmul or not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return func(*args, **kwargs)
    return run_product(frame, "matmul", func, args, kwargs,
                lambda c, s, st, g: AF.matmul(a, b, config=c, generator=g, stats=st, a_scale=s[0], b_scale=s[1]), (a, b),
                a.shape[-1], lambda y: y.numel() * a.shape[-1])


def _h_rmatmul(frame, func, args, kwargs):
    b, a = args[0], args[1]
    return _h_matmul(frame, torch.matmul, (a, b), {})


def _h_baddbmm(frame, func, args, kwargs):
    def f(input, batch1, batch2, *, beta=1, alpha=1, out=None):
        return input, batch1, batch2, beta, alpha, out
    inp, b1, b2, beta, alpha, out = f(*args, **kwargs)
    if out is not None or not frame.state.include_matmul:
        return func(*args, **kwargs)
    prod = _h_matmul(frame, torch.matmul, (b1, b2), {})
    return beta * inp + alpha * prod if beta != 0 else alpha * prod


def _h_einsum(frame, func, args, kwargs):
    eq = args[0]
    ops = args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if len(ops) != 2 or not frame.state.include_matmul or kwargs:
        if len(ops) > 2:
            _warn_once(f"einsum with {len(ops)} operands stays digital")
        return func(*args, **kwargs)
    a, b = ops
    return run_product(frame, "matmul", func, args, kwargs,
                lambda c, s, st, g: AF.einsum(eq, a, b, config=c, generator=g, stats=st), (a, b),
                0, lambda y: 0)


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
         matmul: Callable[[Tensor, Tensor], Tensor] = torch.matmul) -> Tensor:
    """Scaled dot-product attention with its two products done by ``matmul``; the scaling,
    masking, softmax and dropout are digital (float32)."""
    L, S = query.shape[-2], key.shape[-2]
    sc = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = matmul(query, key.transpose(-2, -1)) * sc
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    attn = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return matmul(attn, value)


def _h_sdpa(frame, func, args, kwargs):
    if not frame.state.include_matmul:
        return func(*args, **kwargs)
    return sdpa(*args, **kwargs, matmul=lambda a, b: _h_matmul(frame, torch.matmul, (a, b), {}))


def _h_mha(frame, func, args, kwargs):
    from .mha import multi_head_attention

    return multi_head_attention(
        *args, **kwargs,
        linear=lambda x, w, b: _h_linear(frame, F.linear, (x, w, b), {}),
        attention=lambda q, k, v, mask, p, causal: _h_sdpa(frame, F.scaled_dot_product_attention, (q, k, v, mask, p, causal), {}),
        matmul=lambda a, b: _h_matmul(frame, torch.matmul, (a, b), {}),
    )


register(F.linear)(_h_linear)
register(torch.conv2d)(_h_conv("conv", AF.conv2d))
register(torch.conv1d)(_h_conv("conv", AF.conv1d))
register(torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm, torch.mm, Tensor.mm)(_h_matmul)
register(Tensor.__rmatmul__)(_h_rmatmul)
register(torch.baddbmm)(_h_baddbmm)
register(torch.einsum)(_h_einsum)
register(F.scaled_dot_product_attention)(_h_sdpa)
register(F.multi_head_attention_forward)(_h_mha)

_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(f"abfp: {msg}", stacklevel=3)


_DIGITAL_PRODUCTS = {torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d, torch.addmm}


class AnalogMode(TorchFunctionMode):
    """Answers product calls with the device while converted modules run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        stack = _stack()
        handler = handler_for(func)
        if handler is None or not stack:
            if func in _DIGITAL_PRODUCTS and stack and stack[-1].state.config_for(stack[-1].name) is not None:
                _warn_once(f"{getattr(func, '__name__', func)} has no analog model and stays digital")
            return func(*args, **kwargs)
        frame = stack[-1]
        if frame.state.config_for(frame.name) is None:
            return func(*args, **kwargs)
        return handler(frame, func, args, kwargs)
