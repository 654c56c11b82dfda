"""Routing products to the device while a converted module runs.

Every module of a converted model gets a forward pre-hook that pushes ``(module name,
state)`` on a thread-local stack (the first one also enters :class:`AnalogMode`, a
``TorchFunctionMode``) and a forward hook that pops it. While the mode is active, the
functional calls that modules make (``F.linear``, ``F.conv1d/2d``, ``torch.matmul``,
``@``, ``bmm``, ``mm``, ``baddbmm``, ``einsum``, ``F.scaled_dot_product_attention``,
``F.multi_head_attention_forward``) are answered by :mod:`abfp.functional` with the config
of the innermost running module. Intercepting the call rather than replacing the module
keeps subclasses that pad inside their own ``forward`` working.

No state outlives a forward, whatever ends it. Each frame remembers the Python frame that ran
its pre-hook (torch's ``Module._call_impl``, which also runs the module's ``forward``): while
that is on the interpreter stack the module is running, once it is gone the frame is *stale*
(its forward ended by an exception that skipped the hook, e.g. a ``BaseException`` such as
``KeyboardInterrupt``, or a traced call). Stale frames are dropped whenever a converted module
enters, exits or runs a product; dropping the frame that entered :class:`AnalogMode` takes the
mode (and any mode pushed above it and left behind) off torch's function-mode stack. An exit
finds its own frame by module, so exits that do not match the top repair the stack rather than
popping someone else's frame. Tracing a converted model (``torch.export``, ``torch.compile``)
is refused before any state is touched.
"""

from __future__ import annotations

import math
import sys
import threading
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from .. import functional as AF
from ..config import ABFPConfig
from ..numerics import ProductStats
from ..numerics.blocks import num_tiles
from ..ops.coverage import DigitalProductWarning, estimate_macs, func_name, no_analog_model
from ..ops.registry import handler_for, register
from .state import AnalogState, SiteRecord

_tls = threading.local()


def _stack() -> list[list[Any]]:
    s = getattr(_tls, "stack", None)
    if s is None:
        s = _tls.stack = []
    return s


class Frame:
    """One running converted module: its name, its state, its per-kind product counter, the
    module and the Python frame running it (``caller``), and the :class:`AnalogMode` it entered
    (the outermost frame only)."""

    __slots__ = ("name", "state", "counts", "mode", "module", "caller")

    def __init__(self, name: str, state: AnalogState, module: torch.nn.Module | None = None,
                 caller: types.FrameType | None = None) -> None:
        self.name = name
        self.state = state
        self.counts: dict[str, int] = {}
        self.mode: AnalogMode | None = None
        self.module = module
        self.caller = caller

    def site(self, op: str) -> str:
        i = self.counts.get(op, 0)
        self.counts[op] = i + 1
        return f"{self.name}:{op}{i}"


def _running(caller: types.FrameType | None, start: types.FrameType | None) -> bool:
    """Whether ``caller`` is on the interpreter stack at or above ``start``."""
    if caller is None:  # a frame pushed without one (tests): trust it
        return True
    f = start
    while f is not None:
        if f is caller:
            return True
        f = f.f_back
    return False


def _leave_mode(mode: "AnalogMode") -> None:
    """Take ``mode`` off torch's function-mode stack with every mode above it (left behind by
    code that ran inside the converted forward); nothing if it is not there."""
    modes = _get_current_function_mode_stack()
    if not any(m is mode for m in modes):
        return
    while torch._C._len_torch_function_stack() > 0:
        if torch._C._pop_torch_function_stack() is mode:
            break


def _leave_orphan_modes() -> None:
    """Take off torch's stack every :class:`AnalogMode` that no frame holds (one whose frames were
    dropped as stale while it was answering a call, when it could not be popped)."""
    while True:
        orphan = next((m for m in _get_current_function_mode_stack() if isinstance(m, AnalogMode)), None)
        if orphan is None:
            return
        _leave_mode(orphan)


def _pop(stack: list[Frame]) -> Frame:
    frame = stack.pop()
    if frame.mode is not None:
        _leave_mode(frame.mode)
        frame.mode = None
    frame.caller = None  # drop the reference to the interpreter frame
    return frame


def drop_stale(stack: list[Frame] | None = None, start: types.FrameType | None = None) -> int:
    """Drop the frames on top of ``stack`` whose module is no longer running (their forward ended
    without the exit hook); returns how many. A stale frame lies above every running one."""
    stack = _stack() if stack is None else stack
    start = sys._getframe(1) if start is None else start
    n = 0
    while stack and not _running(stack[-1].caller, start):
        _pop(stack)
        n += 1
    return n


class EnterHook:
    """Forward pre-hook of a converted module: drops stale frames, pushes this module's frame,
    and enters :class:`AnalogMode` if no running frame holds it."""

    def __init__(self, name: str, state: AnalogState) -> None:
        self.name = name
        self.state = state

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"abfp: a converted model cannot be traced (torch.export / torch.compile reached {self.name or 'the root'!r}); "
                "export or compile the float32 model: abfp.to_digital(model, inplace=False)")
        caller = sys._getframe(1)  # torch's Module._call_impl, which runs forward next
        stack = _stack()
        drop_stale(stack, caller)
        frame = Frame(self.name, self.state, module, caller)
        if not any(f.mode is not None for f in stack):
            _leave_orphan_modes()
            frame.mode = AnalogMode()
            frame.mode.__enter__()
        stack.append(frame)


class ExitHook:
    """Forward hook of a converted module (runs also when forward raises an ``Exception``):
    pops this module's frame and every (stale) frame above it; an exit that matches no frame
    (its frame was dropped as stale already) changes nothing."""

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        stack = _stack()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].module is module:
                while len(stack) > i:
                    _pop(stack)
                return


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
    """Static activation scales of a fixed-point site (SPEC section 2: calibrated once on sample
    data); ``[None, None]`` in ABFP mode. An uncalibrated fixed-point site raises rather than
    falling back to each call's own max (which would make the baseline dynamic, per batch)."""
    if cfg.mode != "fixed":
        return [None, None]
    s = state.input_scales.get(site)
    if s is None:
        raise ValueError(
            f"abfp: product {site} runs in fixed-point mode but has no calibrated activation scale "
            "(SPEC section 2: one static scale calibrated on sample data); "
            "call abfp.calibrate(model, batches) first")
    return list(s) + [None] * (2 - len(s))


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
        y = interceptor(ProductCall(
            site=site, kind=op, config=cfg, operands=operands,
            analog=lambda c=cfg: analog(c, _scales(state, c, site), None, state.generator(c, operands[0].device)),
            digital=lambda: func(*args, **kwargs),
            call=(func, args, kwargs),
        ))
        state.coverage.analog_macs += int(macs(y)) if isinstance(y, Tensor) else 0
        return y
    stats = ProductStats() if state.recording else None
    y = analog(cfg, _scales(state, cfg, site), stats, state.generator(cfg, operands[0].device))
    state.coverage.analog_macs += int(macs(y))
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
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return func(*args, **kwargs)
    if not frame.state.include_matmul:
        return digital_call(frame, func, args, kwargs, "include_matmul=False")
    return run_product(frame, "matmul", func, args, kwargs,
                lambda c, s, st, g: AF.matmul(a, b, config=c, generator=g, stats=st, a_scale=s[0], b_scale=s[1]), (a, b),
                a.shape[-1], lambda y: y.numel() * a.shape[-1])


def _h_rmatmul(frame, func, args, kwargs):
    b, a = args[0], args[1]
    return _h_matmul(frame, torch.matmul, (a, b), {})


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
        return digital_call(frame, func, args, kwargs, "include_matmul=False")
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
register(F.scaled_dot_product_attention)(_h_sdpa)
register(F.multi_head_attention_forward)(_h_mha)

def digital_call(frame: Frame, func: Callable, args: tuple, kwargs: dict, reason: str) -> Any:
    """Run a product in float32 and count its MACs as digital (coverage): ``reason`` says why
    (an excluded module, ``include_matmul=False``); products with no analog model at all are
    also named in a :class:`~abfp.ops.coverage.DigitalProductWarning`."""
    out = func(*args, **kwargs)
    state = frame.state
    if state.calibrating:
        return out
    macs = estimate_macs(func, args, kwargs, out)
    name = func_name(func)
    state.coverage.add_digital(f"{name} ({reason})", macs)
    if state.recording:
        site = frame.site("digital")
        rec = state.records.get(site)
        if rec is None:
            rec = state.records[site] = SiteRecord(site=site, kind="digital", config=None)
        rec.x_shape = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else ()
        rec.w_shape = tuple(args[1].shape) if len(args) > 1 and isinstance(args[1], Tensor) else ()
        rec.calls += 1
        rec.macs += macs
    return out


class AnalogMode(TorchFunctionMode):
    """Answers product calls with the device while converted modules run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        stack = _stack()
        if not stack:
            return func(*args, **kwargs)
        handler = handler_for(func)
        name = no_analog_model(func) if handler is None else None
        if handler is None and name is None:  # not a product
            return func(*args, **kwargs)
        drop_stale(stack, sys._getframe(1))
        if not stack:
            return func(*args, **kwargs)
        frame = stack[-1]
        if handler is None:
            state = frame.state
            if state.config_for(frame.name) is not None and not state.calibrating and name not in state.coverage.warned:
                state.coverage.warned.add(name)
                warnings.warn(f"abfp: {name} (in {frame.name or 'the model'}) has no analog model and ran in "
                              "float32; abfp.summary lists its MACs", DigitalProductWarning, stacklevel=2)
            return digital_call(frame, func, args, kwargs, "no analog model")
        if frame.state.config_for(frame.name) is None:
            return digital_call(frame, func, args, kwargs, "excluded module")
        return handler(frame, func, args, kwargs)
