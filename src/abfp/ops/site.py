"""The common path of every analog product inside a converted model: :func:`run_product`.

A product family's handler hands each of its products to :func:`run_product` with the
innermost running module's :class:`Frame`; it does, in this order, calibration (fixed point:
record ``max |operand|`` and run float32), the interceptors (DNF, dynamic-precision noise: they
see a :class:`ProductCall`), the device call, the coverage count, and the recording for
``summary`` and energy (:class:`SiteRecord`). A product kept in float32 goes through
:func:`digital_call` instead (counted as digital).

**No count outlives a failed call.** Every change a product makes to its model's state (the
coverage counts, the records of ``summary`` and energy, the calibrated scales) is also written,
as the function that puts it back, to a per-thread *undo log*; a converted module whose call
ends in an exception rolls back what that call changed (:func:`undo_to` its :func:`undo_mark`,
in :class:`abfp.nn.mode.GuardedForward`), so ``abfp.coverage`` and energy totals are those of
the calls that returned; the outermost module's return, or the next outermost call, forgets
the log (:func:`undo_forget`). An exception caught inside a forward (user code that retries a
submodule) rolls back the failed submodule call alone. What is not rolled back: the noise
streams (a seeded stream continues, as torch's global generator does after a failed call),
the once-per-model ``DigitalProductWarning`` memory (the warning was shown), and the counts of a
traced graph (``torch.compile``, ``torch.export``): its products are counted by the custom
operator ``abfp::count`` as the graph runs (:func:`_traced`), outside the log, so a compiled call
that raises keeps the counts of the products its graph ran before the error.
"""

from __future__ import annotations

import math
import operator
import threading
import types
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor

from ..config import ABFPConfig
from ..numerics import ProductStats
from ..numerics.blocks import num_tiles
from .coverage import DigitalProductWarning, estimate_macs, func_name, odd_layout
from .device import NotTraceable, tracing, untraceable

__all__ = ["Frame", "ProductCall", "SiteRecord", "run_product", "digital_call", "check_traceable", "undo_mark",
           "undo_to", "undo_forget"]


class _UndoLog(threading.local):
    """The undo log of this thread (module doc): functions that each put back one change, newest last."""

    def __init__(self) -> None:
        self.entries: list[Callable[[], None]] = []


_UNDO = _UndoLog()


def undo_mark() -> int:
    """Where the undo log stands now: :func:`undo_to` this mark puts back every later change."""
    return len(_UNDO.entries)


def undo_to(mark: int) -> None:
    """Put back, newest first, every change logged since ``mark``."""
    entries = _UNDO.entries
    while len(entries) > mark:
        entries.pop()()


def undo_forget() -> None:
    """Forget the log: the changes in it stay (the outermost converted call returned)."""
    _UNDO.entries.clear()


def _count_analog(coverage: Any, macs: int) -> None:
    """``coverage.analog_macs += macs``, logged (module doc)."""
    coverage.analog_macs += macs

    def undo() -> None:
        coverage.analog_macs -= macs
    _UNDO.entries.append(undo)


def _count_digital(coverage: Any, name: str, macs: int) -> None:
    """``coverage.add_digital(name, macs)``, logged (module doc)."""
    before = coverage.digital_ops.get(name)
    coverage.add_digital(name, macs)

    def undo() -> None:
        coverage.digital_macs -= int(macs)
        if before is None:
            coverage.digital_ops.pop(name, None)
        else:
            coverage.digital_ops[name] = before
    _UNDO.entries.append(undo)


def _logged_put(table: dict, key: str) -> None:
    """Log that ``table[key]`` (a :class:`SiteRecord` or a calibrated scale list) is about to change:
    the undo puts back a copy of the value it has now, or removes the key if it has none."""
    old = table.get(key)
    if old is None:
        def undo() -> None:
            table.pop(key, None)
    else:
        saved = (replace(old, shapes={k: list(v) for k, v in old.shapes.items()}) if isinstance(old, SiteRecord)
                 else list(old))

        def undo() -> None:
            table[key] = saved
    _UNDO.entries.append(undo)


@dataclass
class SiteRecord:
    """Accumulated observations of one analog product site (see :func:`abfp.summary`)."""

    site: str
    kind: str
    x_shape: tuple[int, ...] = ()
    w_shape: tuple[int, ...] = ()
    tiles: int = 0
    calls: int = 0
    macs: int = 0
    adc_conversions: int = 0
    saturated: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    config: ABFPConfig | None = None
    #: False when recorded by ``summary(..., errors=False)``: no float32 reference was run, so
    #: :attr:`relative_error` is unknown (None)
    measured_error: bool = True
    #: ``(x_shape, w_shape) -> [calls, macs]`` for every pair of operand shapes the site ran
    #: with (``x_shape``/``w_shape`` are the last call's): a shared module run on two sequence
    #: lengths, whose counts (DAC conversions, products) :mod:`abfp.energy` takes per shape
    shapes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = field(default_factory=dict)

    def shape_groups(self) -> list[tuple[tuple[int, ...], tuple[int, ...], int, int]]:
        """``(x_shape, w_shape, macs, calls)`` per distinct pair of operand shapes, in first-run
        order; one group from the last call's shapes when none were recorded."""
        if not self.shapes:
            return [(tuple(self.x_shape), tuple(self.w_shape), int(self.macs), max(1, int(self.calls)))]
        return [(x, w, macs, calls) for (x, w), (calls, macs) in self.shapes.items()]

    @property
    def saturated_fraction(self) -> float:
        return self.saturated / self.adc_conversions if self.adc_conversions else 0.0

    @property
    def relative_error(self) -> float | None:
        """``||y - y_fp32|| / ||y_fp32||`` over every recorded call; None when not measured."""
        if not self.measured_error:
            return None
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else (0.0 if self.err_sq == 0 else float("inf"))


class Frame:
    """One running converted module: its name, its state (an :class:`abfp.nn.state.AnalogState`),
    its per-kind product counter, the module and the Python frame running it (``caller``), and
    the :class:`abfp.nn.mode.AnalogMode` it entered (the outermost frame only). ``hooks``: the frame
    of a converted root running its forward hooks (:class:`abfp.nn.mode.RootCall`), whose counter
    the root's own frame shares."""

    __slots__ = ("name", "state", "counts", "mode", "module", "caller", "hooks")

    def __init__(self, name: str, state: Any, module: torch.nn.Module | None = None,
                 caller: types.FrameType | None = None) -> None:
        self.name = name
        self.state = state
        self.counts: dict[str, int] = {}
        self.mode: Any = None
        self.module = module
        self.caller = caller
        self.hooks = False

    def site(self, op: str) -> str:
        """The next site of kind ``op`` in this call of the module: ``"<name>:<op><index>"``."""
        i = self.counts.get(op, 0)
        self.counts[op] = i + 1
        return f"{self.name}:{op}{i}"


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
    _logged_put(frame.state.records, site)
    rec = frame.state.records.get(site)
    if rec is None:
        rec = frame.state.records[site] = SiteRecord(site=site, kind=kind, config=cfg)
    rec.x_shape, rec.w_shape = tuple(x_shape), tuple(w_shape)
    rec.tiles = num_tiles(k, cfg.tile_width)
    rec.calls += 1
    rec.macs += macs
    group = rec.shapes.setdefault((rec.x_shape, rec.w_shape), [0, 0])
    group[0] += 1
    group[1] += macs
    # k repeats (SPEC section 5) are simulated as one pass with the averaged noise; the device
    # converts every output k times: count its conversions (as abfp.energy does), and the
    # saturated ones of the simulated pass k times (the fraction is the simulated pass's)
    rec.adc_conversions += stats.conversions * cfg.repeats
    rec.saturated += stats.saturated * cfg.repeats
    rec.measured_error = y_ref is not None
    if y_ref is not None:
        yr = y_ref.detach().double()
        rec.err_sq += float(((y.detach().double() - yr) ** 2).sum())
        rec.ref_sq += float((yr**2).sum())


def _calibrate(state: Any, site: str, *operands: Tensor) -> None:
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
    _logged_put(state.input_scales, site)
    state.input_scales[site] = vals if old is None else [max(o, v) for o, v in zip(old, vals)]


def _scales(state: Any, cfg: ABFPConfig, site: str) -> list[float | None]:
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
    site = frame.site(op) if site is None else site
    cfg = state.config_for_site(frame.name, site)
    if state.interceptors:
        state.check_interceptor_site(site, cfg)
    if cfg is None:  # a product of an excluded module that no site override names
        return digital_call(frame, func, args, kwargs, "excluded module")
    odd = next((t.dtype for t in operands if isinstance(t, Tensor) and not t.is_floating_point()), None)
    if odd is not None:  # integer, bool or complex operands: no DAC encodes them
        return digital_dtype(frame, func, args, kwargs, odd)
    check_half_mix(frame, site, operands)
    check_values(frame, site, operands)
    if tracing():
        return _traced(frame, site, cfg, analog, operands, macs)
    if state.calibrating:
        _calibrate(state, site, *operands)
        return func(*args, **kwargs)
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in operands if isinstance(t, Tensor)):
        raise NotImplementedError(
            f"abfp: product {site} (module {frame.name or 'the root'!r}) runs under a torch.func transform (grad, "
            "vmap, jacrev, ...), which the device products do not support; use autograd (loss.backward(), "
            "torch.autograd.grad) and a batch dimension instead (torch.func.functional_call alone works)")
    if _forward_ad._current_level >= 0 and any(
            isinstance(t, Tensor) and _forward_ad.unpack_dual(t).tangent is not None for t in operands):
        raise NotImplementedError(
            f"abfp: product {site} (module {frame.name or 'the root'!r}) has a dual tensor operand "
            "(torch.autograd.forward_ad): the device products have no forward-mode derivative; use reverse mode "
            "(loss.backward(), torch.autograd.grad)")
    interceptor = state.interceptors.get(site) or state.interceptors.get("*")
    if interceptor is not None:
        y = interceptor(ProductCall(
            site=site, kind=op, config=cfg, operands=operands,
            analog=lambda c=cfg: analog(c, _scales(state, c, site), None, state.generator(c, operands[0].device)),
            digital=lambda: func(*args, **kwargs),
            call=(func, args, kwargs),
        ))
        if isinstance(y, Tensor):
            _count_analog(state.coverage, int(macs(y)))
        return y
    stats = ProductStats() if state.recording else None
    try:
        y = analog(cfg, _scales(state, cfg, site), stats, state.generator(cfg, operands[0].device))
    except (ValueError, TypeError) as e:  # bad input (NaN, Inf, ...): say which product of which module
        if type(e) not in (ValueError, TypeError) or str(e).startswith("abfp: product "):
            raise
        raise type(e)(f"abfp: product {site} (module {frame.name or 'the root'!r}): {e}") from e
    _count_analog(state.coverage, int(macs(y)))
    if state.recording:
        with torch.no_grad():
            y_ref = func(*args, **kwargs) if state.record_errors else None
        _record(frame, site, op, cfg, operands[0].shape, operands[1].shape, k, macs(y), stats, y, y_ref)  # type: ignore[arg-type]
    return y


_HALF = (torch.float16, torch.bfloat16)


def _half_mix(tensors: Any) -> tuple[Tensor, Tensor] | None:
    """The first two floating tensors of ``tensors`` whose dtypes differ, one of them float16 or
    bfloat16, outside ``torch.autocast`` on their device; None when there are none."""
    first = None
    for t in tensors:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            continue
        if first is None:
            first = t
        elif t.dtype != first.dtype and (t.dtype in _HALF or first.dtype in _HALF):
            return None if torch.is_autocast_enabled(first.device.type) else (first, t)
    return None


def _refuse_half_mix(where: str, pair: tuple[Tensor, Tensor]) -> None:
    raise RuntimeError(f"{where} mixes {_dtype_name(pair[0])} and {_dtype_name(pair[1])} operands: torch refuses "
                       "operands of different dtypes (mat1 and mat2 must have the same dtype); cast the input to the model's "
                       "dtype (x.to(dtype)) or the model to the input's (model.to(dtype)), or run it under torch.autocast")


def check_half_mix(frame: Frame, site: str, operands: tuple[Tensor, ...]) -> None:
    """Refuse a product whose operands mix a half-precision dtype (float16, bfloat16) with another
    floating dtype, as torch refuses it (``RuntimeError``, "mat1 and mat2 must have the same dtype"):
    a float16 model given float32 input, a float16 by float32 activation product. Under
    ``torch.autocast`` on the operands' device torch casts them itself, so the mix is allowed
    (docs/families.md, "Under torch.autocast"). float32 with float64 is left as the device computes it
    (in float32, the output in the promoted dtype)."""
    pair = _half_mix(operands)
    if pair is not None:
        _refuse_half_mix(f"abfp: product {site} (module {frame.name or 'the root'!r})", pair)


#: product functions whose every floating tensor argument (the bias, the added matrix) torch
#: requires in one dtype: checked as a whole by :func:`check_call_dtypes`
_ONE_DTYPE = frozenset({F.linear, torch.addmm, Tensor.addmm, torch.baddbmm, Tensor.baddbmm, torch.addbmm,
                        Tensor.addbmm, torch.addmv, Tensor.addmv, torch.conv1d, torch.conv2d, torch.conv3d,
                        torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d, F.bilinear})


def check_call_dtypes(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> None:
    """:func:`check_half_mix` over every tensor argument of a call of :data:`_ONE_DTYPE` (a float16
    linear layer with a float32 bias, ``addmm`` of a float32 matrix and float16 factors: torch refuses
    them, the products alone would not see it)."""
    if func in _ONE_DTYPE:
        pair = _half_mix((*args, *kwargs.values()))
        if pair is not None:
            _refuse_half_mix(f"abfp: {func_name(func)} (module {frame.name or 'the root'!r})", pair)


def masked_operand(where: str) -> TypeError:
    """The error of a product call (``where``: "abfp: torch.einsum (module ...)") with a ``MaskedTensor``
    operand: a ``TypeError``, as torch's own products give one (in dispatcher words naming no product;
    before, an unrelated ``TypeError`` from inside the block scales or the family's reshaping)."""
    return TypeError(f"{where} has a MaskedTensor operand (torch.masked), which the device cannot encode: its "
                     "masked-out elements have no value (torch's own linear, matmul and convolutions do not take it "
                     "either); pass a plain tensor, e.g. mt.get_data().masked_fill(~mt.get_mask(), 0)")


def check_values(frame: Frame, site: str, operands: tuple[Tensor, ...]) -> None:
    """Refuse, in words, operands whose values the device cannot read: outside a tracer, a tensor on
    the ``meta`` device (no values to encode; before, "Tensor.item() cannot be called on meta
    tensors"). A ``MaskedTensor`` is refused before the family's handler runs
    (:class:`abfp.nn.mode.AnalogMode`, :func:`masked_operand`)."""
    where = f"abfp: product {site} (module {frame.name or 'the root'!r})"
    for t in operands:
        if t.is_meta and not tracing():
            raise NotImplementedError(
                f"{where} has an operand on the meta device: the device's products read values (block scales, DAC "
                "codes, the ADC), which a meta tensor has none of; run the model on a real device, or, for shapes "
                "only, run the float32 model (abfp.to_digital(model, inplace=False)) on meta")


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def check_traceable(state: Any) -> None:
    """Raise :class:`~abfp.ops.device.NotTraceable` naming the first module of a converted model
    whose products a tracer cannot record (see :func:`abfp.ops.device.untraceable`), or the
    model-wide reason (calibration, recording, interceptors): checked when a traced call enters
    the model, before any state changes."""
    if state.calibrating or state.recording:
        raise NotTraceable("abfp: a converted model cannot be traced while it calibrates or records for "
                           "abfp.summary (both read values); run them eagerly")
    if state.interceptors:
        raise NotTraceable("abfp: a converted model with interceptors (DNF finetuning, dynamic precision) cannot be "
                           "traced: they run Python on the values")
    for name, cfg in [("", state.config), *state.module_configs.items(), *state.site_overrides.items()]:
        why = None if cfg is None else untraceable(cfg)
        if why is not None:
            raise NotTraceable(f"abfp: module {name or 'the root'!r} cannot be traced: {why}")


def _traced(frame: Frame, site: str, cfg: ABFPConfig, analog: Callable, operands: tuple[Tensor, ...],
            macs: Callable[[Tensor], int]) -> Any:
    """:func:`run_product` under a tracer: the device call as custom operators, then
    ``abfp::count`` with the model's coverage token and the product's MACs (a SymInt under dynamic
    shapes), which counts each time the graph runs (:mod:`abfp.ops.custom`); or a
    :class:`~abfp.ops.device.NotTraceable` naming the product, its module and why (see
    :func:`check_traceable`)."""
    state = frame.state
    where = f"abfp: product {site} (module {frame.name or 'the root'!r}) cannot be traced: "
    if state.calibrating or state.recording or state.interceptors:
        check_traceable(state)
    try:
        y = analog(cfg, _scales(state, cfg, site), None, state.generator(cfg, operands[0].device))
    except NotTraceable as e:
        raise NotTraceable(where + str(e)) from None
    # counted when the graph runs, by abfp::count (a Python counter here would be a constant of the
    # graph, or count the trace rather than the calls); the count is a SymInt under dynamic shapes
    torch.ops.abfp.count(y, state.coverage.token, macs(y), 0, "")
    return y


def warn_digital(frame: Frame, name: str) -> None:
    """Name a product with no analog model (``name``) in a :class:`~abfp.ops.coverage.DigitalProductWarning`,
    once per converted model, unless its module is excluded or the model calibrates."""
    state = frame.state
    if state.config_for(frame.name) is not None and not state.calibrating and name not in state.coverage.warned:
        state.coverage.warned.add(name)
        warnings.warn(f"abfp: {name} (in {frame.name or 'the model'}) has no analog model and ran digitally; "
                      "abfp.summary lists its MACs", DigitalProductWarning, stacklevel=4)


def digital_dtype(frame: Frame, func: Callable, args: tuple, kwargs: dict, dtype: torch.dtype) -> Any:
    """A product of operands no DAC encodes (integer, bool, complex ``dtype``): run as torch
    computes it, named (``Tensor.matmul on complex64 operands``) and counted as digital."""
    name = f"{func_name(func)} on {str(dtype).replace('torch.', '')} operands"
    warn_digital(frame, name)
    return digital_call(frame, func, args, kwargs, "no analog model", name=name)


def digital_call(frame: Frame, func: Callable, args: tuple, kwargs: dict, reason: str, *, name: str | None = None,
                 count: Callable[[Any], int] | None = None) -> Any:
    """Run a product in float32 and count its MACs as digital (coverage): ``reason`` says why
    (an excluded module, ``include_matmul=False``); products with no analog model at all are
    also named in a :class:`~abfp.ops.coverage.DigitalProductWarning` (:func:`warn_digital`).
    ``name``: how coverage and ``summary`` name it (default: the function's name); ``count(out)``:
    its MACs (default: :func:`~abfp.ops.coverage.estimate_macs`)."""
    out = func(*args, **kwargs)
    state = frame.state
    if state.calibrating:
        return out
    macs = estimate_macs(func, args, kwargs, out) if count is None else count(out)
    name = func_name(func) if name is None else name
    if tracing():  # counted when the graph runs (as _traced's products)
        after = next((t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, Tensor)), None)
        torch.ops.abfp.count(after, state.coverage.token, 0, macs, f"{name} ({reason})")
        return out
    _count_digital(state.coverage, f"{name} ({reason})", macs)
    if state.recording:
        site = frame.site("digital")
        _logged_put(state.records, site)
        rec = state.records.get(site)
        if rec is None:
            rec = state.records[site] = SiteRecord(site=site, kind="digital", config=None)
        rec.x_shape = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else ()
        rec.w_shape = tuple(args[1].shape) if len(args) > 1 and isinstance(args[1], Tensor) else ()
        rec.calls += 1
        rec.macs += macs
    return out


_MATMULS = (torch.matmul, Tensor.matmul, Tensor.__matmul__, operator.matmul)


def _nested_rows(x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
    """A nested tensor's rows as one dense ``(..., D)`` tensor and the function that nests a
    row-wise result back the same way; None when its last axis is the ragged one."""
    if x.layout == torch.jagged:
        if x._ragged_idx == x.dim() - 1:
            return None
        return x.values(), lambda y: torch.nested.nested_tensor_from_jagged(
            y, offsets=x.offsets(), lengths=x.lengths(), jagged_dim=x._ragged_idx)
    parts = x.unbind()
    if any(p.dim() == 0 or p.shape[-1] != parts[0].shape[-1] for p in parts):
        return None
    sizes = [p.shape[:-1] for p in parts]
    counts = [math.prod(s) for s in sizes]

    def nest(y: Tensor) -> Tensor:
        return torch.nested.as_nested_tensor([r.reshape(*s, y.shape[-1]) for r, s in zip(y.split(counts), sizes)])

    return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts]), nest


def answer_odd_layout(frame: Frame, handler: Callable[[Frame, Callable, tuple, dict], Any], func: Callable,
                      args: tuple, kwargs: dict, layout: str) -> Any:
    """A product call with an operand that is not a dense tensor (:func:`~abfp.ops.coverage.odd_layout`).
    ``F.linear`` of a nested input (jagged or strided) and dense weights, and a jagged tensor times a
    dense matrix (``nt @ W``), act on each row alone: the rows packed into one dense tensor run on the
    device (``handler``) and the result is nested back.
    Anything else (a sparse operand, a nested weight, nested attention operands) runs as torch
    computes it, named in a ``DigitalProductWarning`` (``torch.mm on sparse_coo operands``) and
    counted as digital."""
    x = args[0] if args else kwargs.get("input")
    rest = {k: v for k, v in kwargs.items() if k != "input"}
    w = args[1] if len(args) > 1 else rest.get("weight", rest.get("other"))
    row_wise = func is torch.nn.functional.linear or (  # torch multiplies a jagged tensor by a matrix, not a strided nested one
        func in _MATMULS and isinstance(w, Tensor) and w.dim() == 2 and x.layout == torch.jagged)
    if row_wise and isinstance(x, Tensor) and x.is_nested and odd_layout(args[1:], rest) is None:
        rows = _nested_rows(x)
        if rows is not None:
            flat, nest = rows
            return nest(handler(frame, func, (flat, *args[1:]), rest))
    name = f"{func_name(func)} on {layout} operands"
    warn_digital(frame, name)
    return digital_call(frame, func, args, kwargs, "no analog model", name=name,
                        count=None if layout not in ("nested", "jagged") else lambda out: _nested_macs(func, args, kwargs, out))


def _nested_macs(func: Callable, args: tuple, kwargs: dict, out: Any) -> int:
    """MACs of a product of nested operands: the sum over its components (each operand's and the
    output's ``i``-th), as :func:`~abfp.ops.coverage.estimate_macs` counts a dense call."""
    if not (isinstance(out, Tensor) and out.is_nested):
        return 0
    outs = out.unbind()

    def part(a: Any, i: int) -> Any:
        return a.unbind()[i] if isinstance(a, Tensor) and a.is_nested else a

    return sum(estimate_macs(func, tuple(part(a, i) for a in args), {k: part(v, i) for k, v in kwargs.items()}, o)
               for i, o in enumerate(outs))
