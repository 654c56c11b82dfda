"""Routing products to the device while a converted module runs.

Every module of a converted model gets an instance-level ``forward``, :class:`GuardedForward`,
that pushes ``(module name, state)`` on a thread-local stack (the first one also enters
:class:`AnalogMode`, a ``TorchFunctionMode``), runs the module's own forward and pops it
(no torch hooks: torch calls a module without hooks on its fast path, and a module with hooks
costs about 15 us of Python per call). While the mode is active, the
functional calls that modules make (``F.linear``, ``F.conv1d/2d``, ``torch.matmul``,
``@``, ``bmm``, ``mm``, ``baddbmm``, ``einsum``, ``F.scaled_dot_product_attention``,
``F.multi_head_attention_forward``, and every function a product family of :mod:`abfp.ops`
registers) are answered by that family's handler with the frame of the innermost running
module; each product then takes the common path :func:`abfp.ops.site.run_product`. Functions
that are no product are remembered (``abfp.ops.registry.PLAIN``) and answered at once. This
module is only the dispatch: frames, :class:`AnalogMode`. Intercepting the call rather than replacing the module
keeps subclasses that pad inside their own ``forward`` working.

No state outlives a forward, whatever ends it: a call that raises rolls back the counts and
records its products made (the undo log of :mod:`abfp.ops.site`), and :class:`GuardedForward` pops the module's frame
however its forward ends (an exception of any kind, under non-strict ``torch.export`` too,
whose own function mode lies below :class:`AnalogMode` and would otherwise be left behind when
its cleanup pops ours). Each frame remembers the Python frame that pushed it (the wrapper's
call, which runs the module's ``forward``): while that is on the interpreter stack the module
is running, once it is gone the frame is *stale* (its forward ended without popping it, e.g.
a traced call). Stale frames are dropped whenever a converted module
enters, exits or runs a product; dropping the frame that entered :class:`AnalogMode` takes the
mode (and any mode pushed above it and left behind) off torch's function-mode stack. An exit
finds its own frame by module, so exits that do not match the top repair the stack rather than
popping someone else's frame. Under a tracer (``torch.compile``, ``torch.export``,
``torch.jit.trace``) frames are trusted without looking at the interpreter stack, and the
products become the custom operators of :mod:`abfp.ops.custom`.

**Direct sites** (``AnalogState.direct``, a :class:`DirectSites` set by an interceptor that
only needs the float32 product, e.g. DNF training): while ``direct.active()``, a module that is
neither a *leaf site* nor a *functional* module, entered while no :class:`AnalogMode` runs,
pushes no frame and enters no mode: it runs as the float32 module, its products float32 (the
interceptor's answer at a site it does not touch). A leaf site (``nn.Linear``, ``nn.Conv1d/2d/3d``
whose one product is its output) is never intercepted: it pushes no frame, runs without the
mode (taken off torch's stack for its call when a functional module around it holds it) and
its wrapper hands its output to ``direct.output``. A functional module (one whose own ``forward`` makes products, e.g. ``q @ k``)
enters the mode as usual, so its products are named and intercepted as always, and so are those
of every module it calls (other than leaf sites).
"""

from __future__ import annotations

import dis
import inspect
import sys
import threading
import types
from typing import Any

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.masked import MaskedTensor
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from ..ops.attention import flex_eager, flex_restore, sdpa  # noqa: F401  (sdpa re-exported: it lived here)
from ..ops.coverage import _NO_ANALOG_MODEL as NO_ANALOG_MODEL, func_name, no_analog_model, odd_layout
from ..ops.device import NotTraceable, tracing
from ..ops.registry import PLAIN as _PLAIN, handler_for, registered as registry_funcs, size as registry_size
from ..ops.site import (Frame, ProductCall, _calibrate, _record, _scales, answer_odd_layout, check_call_dtypes,  # noqa: F401
                        check_traceable,
                        digital_call, masked_operand, run_product, undo_forget, undo_mark, undo_to, warn_digital)
from .state import AnalogState

__all__ = ["AnalogMode", "DigitalSpectralNorm", "DirectSites", "Frame", "GuardedForward", "GuardedMethod", "ProductCall",
           "RootCall", "RootCompile",
           "computing_methods", "digital_call", "makes_products", "product_names",
           "drop_stale", "leave", "off_mode", "run_product"]

#: torch modules whose own ``forward`` makes no product (activations, norms, pooling, dropout,
#: reshapes, ``nn.Sequential``, which only calls its children): they never hold the frame of a
#: product, so ``convert`` leaves them as they are (no wrapped ``forward``, no Python of ours per
#: call). The class's forward as torch defines it: a subclass, a patched class or an
#: instance-level ``forward`` is wrapped.
_PRODUCT_FREE = {cls: cls.forward for cls in (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardswish,
    nn.Hardsigmoid, nn.Softmax, nn.LogSoftmax, nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Sequential)}


def product_free(module: nn.Module) -> bool:
    """Whether ``module`` is one of :data:`_PRODUCT_FREE` running its class's own ``forward``."""
    fwd = _PRODUCT_FREE.get(type(module))
    return fwd is not None and type(module).forward is fwd and "forward" not in module.__dict__


def _unconverted_below(module: torch.nn.Module, name: str) -> str | None:
    """The name of a module below ``module`` that can make products but has no
    :class:`GuardedForward` (added or replaced after ``convert``), looking through product-free
    containers; None when there is none."""
    for child_name, child in module._modules.items():
        if child is None or isinstance(child.__dict__.get("forward"), GuardedForward):
            continue
        full = f"{name}.{child_name}" if name else child_name
        if not product_free(child):
            return full
        found = _unconverted_below(child, full)
        if found is not None:
            return found
    return None


_tls = threading.local()
_tls.stack = []  # the importing thread's, made here so that a compiled call does not guard on its creation


def _stack() -> list[Frame]:
    s = getattr(_tls, "stack", None)
    if s is None:
        s = _tls.stack = []
    return s


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
    flex_restore(mode._flex_before)
    mode._flex_before = None


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
    without popping them); returns how many. A stale frame lies above every running one."""
    stack = _stack() if stack is None else stack
    start = sys._getframe(1) if start is None else start
    n = 0
    while stack and not _running(stack[-1].caller, start):
        _pop(stack)
        n += 1
    return n


class DirectSites:
    """What ``AnalogState.direct`` holds (module doc): ``leaf`` maps each leaf-site module to its
    site, ``functional`` names the modules whose own forward makes products; :meth:`active` says
    whether the shortcut applies now, :meth:`output` returns a leaf site's output as the
    interceptor would have answered its product (``y`` is the float32 product)."""

    leaf: dict[torch.nn.Module, str]
    functional: frozenset[str]

    def active(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def output(self, site: str, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _mode_running(stack: list[Frame]) -> bool:
    for f in stack:
        if f.mode is not None:
            return True
    return False


def _enter(name: str, state: AnalogState, module: torch.nn.Module, caller: types.FrameType | None,
           hooks: bool = False) -> None:
    """Push ``module``'s frame (after dropping stale frames) and enter :class:`AnalogMode` if no
    running frame holds it. ``caller``: the interpreter frame running the module (``None``
    while dynamo traces: a frame it traces is trusted; a failed dynamo trace changes no Python
    state). ``hooks``: the frame of a root running its hooks (:class:`RootCall`); the root's own
    frame pushed on it shares its site counter (one numbering over hooks and forward)."""
    stack = _stack()
    if caller is not None:
        drop_stale(stack, caller)
        if not stack:  # an outermost call: what an earlier one logged and never forgot is settled
            undo_forget()
    frame = Frame(name, state, module, caller)
    frame.hooks = hooks
    if stack and stack[-1].hooks and stack[-1].module is module:
        frame.counts = stack[-1].counts
    if not _mode_running(stack):
        if tracing():
            check_traceable(state)  # refuse before any state changes
        _leave_orphan_modes()
        frame.mode = AnalogMode()
        frame.mode.__enter__()
    stack.append(frame)


def leave(module: torch.nn.Module) -> None:
    """Pop ``module``'s frame and every (stale) frame above it; nothing if no frame is
    ``module``'s (its frame was dropped as stale already, or never pushed)."""
    stack = _stack()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i].module is module:
            while len(stack) > i:
                _pop(stack)
            return


def off_mode(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with a running :class:`AnalogMode` taken off torch's stack for the
    call (weight preparation: its products are float32 and counted nowhere, as a deployed model's
    weights are prepared once before they reach the device); under dynamo, as it is."""
    if not torch.compiler.is_dynamo_compiling() and torch._C._len_torch_function_stack() > 0 and isinstance(
            mode := torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1), AnalogMode):
        torch._C._pop_torch_function_stack()
        try:
            return fn(*args, **kwargs)
        finally:
            torch._C._push_on_torch_function_stack(mode)
    if torch.compiler.is_dynamo_compiling():
        with torch._C.DisableTorchFunction():
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


class DigitalSpectralNorm(SpectralNorm):
    """The forward pre-hook of :func:`torch.nn.utils.spectral_norm` (the hook form; the
    parametrization form is a ``ParametrizationList``, see ``weight_preparation``), its power
    iteration and ``sigma`` run as weight preparation (:func:`off_mode`): ``convert`` sets a
    converted module's hook to this class, ``to_digital`` back (``isinstance(hook, SpectralNorm)``
    holds, so ``remove_spectral_norm`` and the state-dict hooks work as before)."""

    def __call__(self, module: torch.nn.Module, inputs: Any) -> None:
        return off_mode(super().__call__, module, inputs)


def _settle(state: AnalogState) -> None:
    """After a converted module returned: when it was the outermost (a whole forward ran), check
    the site overrides and interceptor sites it left unmatched."""
    if (state._unsettled or state._pending_sites) and not _stack() and not torch.compiler.is_dynamo_compiling():
        state.check_site_overrides()
        state.check_interceptor_sites()


class GuardedForward:
    """A converted module's ``forward`` (an instance attribute; the module has no hooks, so torch
    calls it on its fast path): pushes the module's frame (module doc), runs the module's own
    forward, and pops the frame however that ends, an exception of any kind included (torch
    would skip an always-called exit hook while ``torch.compiler.is_compiling()``, in non-strict
    ``torch.export``, or for a ``BaseException``; a tracer's own mode pushed below
    :class:`AnalogMode` would then be popped by the tracer's cleanup in place of ours). With
    active direct sites, a module that is neither functional nor inside a running mode pushes
    no frame, and a leaf site's output goes through ``direct.output`` (module doc).
    ``inner``: an instance-level ``forward`` the module had before conversion (``None``: its
    class's)."""

    def __init__(self, module: torch.nn.Module, inner: Any = None, name: str = "",
                 state: AnalogState | None = None, *, weight_preparation: bool = False) -> None:
        self.module = module
        self.inner = inner
        self.name = name
        self.state = state
        #: a module that prepares a weight (a ``torch.nn.utils.parametrize`` parametrization, e.g.
        #: spectral norm's power iteration): it runs digitally, off the mode, with no frame and no
        #: count, as a deployed model's weights are prepared once before they reach the device
        self.weight_preparation = weight_preparation

    def _forward(self) -> Any:
        return self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)

    def __setstate__(self, saved: dict) -> None:
        """A copy (``copy.deepcopy``, pickle, ``torch.save``) of a converted model: torch leaves the
        root's :class:`RootCall` out of every copy (``nn.Module.__getstate__`` drops
        ``_compiled_call_impl``), so the root's guard sets a fresh one on the copied root (a
        ``__dict__`` entry, which the root's own ``__setstate__`` afterwards leaves alone)."""
        self.__dict__.update(saved)
        if not self.name and self.state is not None and not self.weight_preparation:
            RootCall.install(self.module)

    @property
    def __signature__(self) -> inspect.Signature:  # what torch.export and inspect see
        return inspect.signature(self._forward())

    @property
    def __code__(self) -> types.CodeType:  # torch.export names its shape environment after it
        fwd = self._forward()
        return getattr(fwd, "__code__", None) or fwd.func.__code__  # a function, or a partial

    @property
    def __globals__(self) -> dict:
        """What ``torch.jit.script`` reads first from a ``forward`` it compiles: refused in words
        (an ``AttributeError``, so ``getattr(f, "__globals__", default)`` still sees none). Before,
        the error was "'GuardedForward' object has no attribute '__globals__'"."""
        raise AttributeError(
            f"abfp: {'module ' + repr(self.name) if self.name else 'the root module'} is converted (abfp.convert), "
            "and torch.jit.script cannot "
            "compile it: its products are routed to the device by Python (a TorchFunctionMode), which TorchScript "
            "does not run. Use torch.jit.trace, torch.compile or torch.export (each device product one custom "
            "operator), or script abfp.to_digital(model, inplace=False) for the float32 model")

    def _run(self, args: tuple, kwargs: dict) -> Any:
        if self.inner is None:  # the class's forward, without binding it (runs at every module call)
            return type(self.module).forward(self.module, *args, **kwargs)
        return self.inner(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        state = self.state
        if self.weight_preparation:
            return off_mode(self._run, args, kwargs)
        direct = None if state is None else state.direct
        if direct is not None and self.name not in direct.functional and direct.active():
            site = direct.leaf.get(module)
            if not _mode_running(_stack()):  # the float32 module, no frame
                out = self._run(args, kwargs)
                return direct.output(site, out) if site is not None and isinstance(out, torch.Tensor) else out
            if site is not None and torch._C._len_torch_function_stack() > 0 and isinstance(
                    mode := torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1), AnalogMode):
                # a leaf site inside a functional module: its one product is float32 (the mode would
                # answer it with the product itself), so it runs without the mode and without a frame
                torch._C._pop_torch_function_stack()
                try:
                    out = self._run(args, kwargs)
                finally:
                    torch._C._push_on_torch_function_stack(mode)
                return direct.output(site, out) if isinstance(out, torch.Tensor) else out
        mark = -1
        if state is not None:
            dynamo = torch.compiler.is_dynamo_compiling()
            _enter(self.name, state, module, None if dynamo else sys._getframe(0))
            mark = -1 if dynamo else undo_mark()
        try:
            out = self._run(args, kwargs)
        except BaseException:
            leave(module)
            if mark >= 0:  # this call's counts and records go (abfp.ops.site, "No count outlives a failed call")
                undo_to(mark)
            raise
        if state is not None:
            leave(module)
            if mark >= 0 and not _stack():
                undo_forget()
            _settle(state)
        if direct is not None and isinstance(out, torch.Tensor):
            site = direct.leaf.get(module)
            if site is not None and direct.active():
                return direct.output(site, out)
        return out


_module_globals = sys.modules[nn.Module.__module__]  # torch's global module hooks live there


def _has_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether torch's ``_call_impl`` runs forward hooks or forward pre-hooks around ``module``'s
    forward (its own or global ones, ``nn.modules.module.register_module_forward_hook``)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _module_globals._global_forward_hooks
                or _module_globals._global_forward_pre_hooks)


class RootCall:
    """What a converted model's root calls in place of torch's ``_call_impl`` (set as the root's
    ``_compiled_call_impl``, which ``nn.Module.__call__`` calls when set). torch runs a module's
    forward hooks and forward pre-hooks in ``_call_impl``, outside its ``forward``: for every other
    module that is inside its parent's forward (a converted frame), for the root outside any, so a
    product in a root hook (``m.register_forward_hook(lambda mod, i, o: o @ P)``) ran in float32,
    uncounted. While the root has such hooks (its own, registered before or after ``convert``, with
    kwargs, ``always_call``, ``prepend``, or global ones), this pushes the root's frame around the
    whole of ``_call_impl``: hooks and forward run inside it, their products are device products of
    the root, one site numbering across them (:func:`_enter`: a pre-hook's ``matmul`` is
    ``:matmul0``, the forward's next). So does a root whose ``forward`` was replaced after ``convert``
    (``m.forward = lambda x: old(x) @ W``: the replacement runs outside any converted frame). Otherwise
    it calls ``_call_impl`` at once (one Python call per forward). ``inner``: a ``_compiled_call_impl``
    the root had (``Module.compile()`` before ``convert``, or :class:`RootCompile` after it), called
    in place of ``_call_impl``. Set by ``convert`` and on copies (:meth:`GuardedForward.__setstate__`),
    removed by ``to_digital`` (:meth:`uninstall`). With direct sites active (DNF) a root that is not
    functional runs its hooks as its forward runs, without a frame (module doc)."""

    def __init__(self, module: torch.nn.Module, inner: Any = None) -> None:
        self.module = module
        self.inner = inner

    @staticmethod
    def install(module: torch.nn.Module) -> None:
        """Set ``module``'s :class:`RootCall` (keeping a ``_compiled_call_impl`` it has as ``inner``)
        and its :class:`RootCompile` (``module.compile()`` keeps the RootCall)."""
        before = module.__dict__.get("_compiled_call_impl")
        if not isinstance(before, RootCall):
            module.__dict__["_compiled_call_impl"] = RootCall(module, before)
        if not isinstance(module.__dict__.get("compile"), RootCompile):
            module.__dict__["compile"] = RootCompile(module)

    @staticmethod
    def uninstall(module: torch.nn.Module) -> None:
        """Put back what ``module`` called before :meth:`install` (nothing: ``_call_impl``)."""
        if isinstance(module.__dict__.get("compile"), RootCompile):
            del module.__dict__["compile"]
        call = module.__dict__.get("_compiled_call_impl")
        if isinstance(call, RootCall):
            if call.inner is None:
                del module.__dict__["_compiled_call_impl"]
            else:
                module.__dict__["_compiled_call_impl"] = call.inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        call = self.inner if self.inner is not None else type(module)._call_impl.__get__(module)
        guard = module.__dict__.get("forward")
        if isinstance(guard, GuardedForward):
            if not _has_forward_hooks(module) or guard.state is None:
                return call(*args, **kwargs)
            state, name = guard.state, guard.name
        else:  # the root's forward replaced after convert (``m.forward = f``): f runs in the root's frame
            state, name = module.__dict__.get("abfp_state"), ""
            if not isinstance(state, AnalogState):
                return call(*args, **kwargs)
        direct = state.direct
        if direct is not None and name not in direct.functional and direct.active() and not _mode_running(_stack()):
            return call(*args, **kwargs)
        dynamo = torch.compiler.is_dynamo_compiling()
        _enter(name, state, module, None if dynamo else sys._getframe(0), hooks=True)
        mark = -1 if dynamo else undo_mark()
        try:
            out = call(*args, **kwargs)
        except BaseException:
            leave(module)
            if mark >= 0:  # the failed call's counts go, its always-called hooks' included (GuardedForward)
                undo_to(mark)
            raise
        leave(module)
        if mark >= 0 and not _stack():
            undo_forget()
        _settle(state)
        return out


class RootCompile:
    """A converted root's ``compile`` (an instance attribute set with its :class:`RootCall`):
    ``model.compile(*args, **kwargs)`` as ``nn.Module.compile`` does it (``torch.compile`` of
    ``_call_impl`` with the same arguments), the compiled call installed as the ``inner`` of a
    fresh :class:`RootCall` rather than in its place. ``nn.Module.compile`` would set the compiled
    ``_call_impl`` as ``_compiled_call_impl`` itself, dropping the RootCall: a product in a root
    forward hook would run in float32 again, uncounted. Copies carry it as ``__dict__`` entry
    (a copy is not compiled: torch drops ``_compiled_call_impl`` from copies, the copy's RootCall
    has no ``inner``); ``to_digital`` removes it."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        module = self.module
        compiled = torch.compile(type(module)._call_impl.__get__(module), *args, **kwargs)
        module.__dict__["_compiled_call_impl"] = RootCall(module, compiled)


class GuardedMethod(GuardedForward):
    """A public method of a converted module other than ``forward`` that computes with the module's
    own children or parameters (OpenAI CLIP's ``encode_text``: ``self.transformer(x) ...
    @ self.text_projection``), set as an instance attribute of that name by ``convert``: called from
    outside any converted forward it runs as ``forward`` does, its own products on the device under
    the module's name (they ran in float32, uncounted); called inside one (a helper of ``forward``)
    it is the plain method, its products the running frame's as before. ``func``: the class's function."""

    def __init__(self, module: torch.nn.Module, func: Any, name: str, state: AnalogState) -> None:
        super().__init__(module, None, name, state)
        self.func = func

    def _forward(self) -> Any:
        return types.MethodType(self.func, self.module)

    def _run(self, args: tuple, kwargs: dict) -> Any:
        return self.func(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _stack():  # called inside a converted forward: its products belong to the running frame, as before
            return self.func(self.module, *args, **kwargs)
        if inspect.isgeneratorfunction(inspect.unwrap(self.func)):
            return self._steps(self.func(self.module, *args, **kwargs))
        return super().__call__(*args, **kwargs)

    def _steps(self, gen: Any) -> Any:
        """A generator method (``def stream(self, xs): for x in xs: yield self.fc(x) @ W``): its body
        runs between the consumer's ``next`` calls, after this call returned, so each step (up to
        the next ``yield``) runs in the module's frame as ``forward`` does (its products ran in
        float32, uncounted, until session 18)."""
        step = _GeneratorStep(self, gen)
        sent = None
        try:
            while True:
                done, value = step(sent)
                if done:
                    return value
                sent = yield value
        finally:
            gen.close()


class _GeneratorStep(GuardedForward):
    """One step of a generator method's generator (:meth:`GuardedMethod._steps`) in the module's frame:
    ``(True, return value)`` when it finished, else ``(False, the yielded value)``."""

    def __init__(self, owner: GuardedMethod, gen: Any) -> None:
        super().__init__(owner.module, None, owner.name, owner.state)
        self.gen = gen

    def _run(self, args: tuple, kwargs: dict) -> Any:
        try:
            return False, self.gen.send(args[0])
        except StopIteration as end:
            return True, end.value


#: names of ``nn.Module``'s own attributes: never wrapped as methods (``state_dict``, ``train``, ...)
_MODULE_NAMES = frozenset(dir(nn.Module))


def product_names() -> frozenset[str]:
    """The names by which code calls a product: the last part of every function a product family
    answers or :mod:`abfp.ops.coverage` names as having no analog model (``matmul``, ``bmm``, ``mm``,
    ``einsum``, ``linear``, ``conv2d``, ``baddbmm``, ``tensordot``, ``cdist``, ``solve``, ...), as a
    code object lists them in ``co_names`` (``torch.einsum``, ``F.linear``, ``a.matmul(b)``)."""
    size = registry_size() + len(NO_ANALOG_MODEL)
    if size != _PRODUCT_NAMES[0]:
        funcs = [*registry_funcs(), *NO_ANALOG_MODEL]
        _PRODUCT_NAMES[:] = [size, frozenset(n for f in funcs if (n := func_name(f).rsplit(".", 1)[-1])
                                             and not n.startswith("_"))]
    return _PRODUCT_NAMES[1]


_PRODUCT_NAMES: list[Any] = [-1, frozenset()]


def makes_products(code: types.CodeType) -> bool:
    """Whether ``code`` (or a function, lambda or comprehension defined in it) multiplies with the
    ``@`` operator (``a @ b``, ``a @= b``) or names a product function (:func:`product_names`).
    Remembered per code object (``convert`` asks once per class, not once per module)."""
    names = product_names()
    known = _MAKES.get(code)
    if known is not None and known[0] is names:
        return known[1]
    found = bool(names.intersection(code.co_names)) or any(
        ins.opname in ("BINARY_MATRIX_MULTIPLY", "INPLACE_MATRIX_MULTIPLY")
        or (ins.opname == "BINARY_OP" and ins.argrepr in ("@", "@=")) for ins in dis.get_instructions(code)) or any(
        makes_products(c) for c in code.co_consts if isinstance(c, types.CodeType))
    _MAKES[code] = (names, found)
    return found


_MAKES: dict[types.CodeType, tuple[frozenset[str], bool]] = {}


def computing_methods(module: torch.nn.Module) -> list[tuple[str, Any]]:
    """``(name, function)`` of the public methods of ``module``'s class (not ``forward``, not
    ``nn.Module``'s, not those of torch's own classes, no properties, static or class methods) whose
    code names one of its children, parameters or buffers (``self.encoder``, ``self.text_projection``):
    the methods that compute with the module's own layers and weights; or makes a product of its own
    (:func:`makes_products`: ``def scores(self, a, b): return a @ b.T``, ``torch.einsum`` of its
    arguments). A decorated method (``functools.wraps``) is judged by the function it wraps."""
    own = set(module._modules) | set(module._parameters) | set(module._buffers)
    found: dict[str, Any] = {}
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch."):  # torch's own classes (nn.Linear.reset_parameters, ...): no
            continue
        for attr, fn in vars(cls).items():
            if attr in found or attr.startswith("_") or attr == "forward" or attr in _MODULE_NAMES:
                continue
            code = getattr(inspect.unwrap(fn), "__code__", None) if inspect.isfunction(fn) else None
            if code is not None and (own.intersection(code.co_names) or makes_products(code)):
                found[attr] = fn
            else:
                found.setdefault(attr, None)  # a subclass's non-method of this name hides the base's
    return [(k, f) for k, f in found.items() if f is not None and not isinstance(module.__dict__.get(k), GuardedMethod)
            and k not in module.__dict__]


def _control_flow() -> dict[Any, Any]:
    """torch's control-flow operators whose branches or bodies are user code (``torch.cond``,
    ``while_loop``, ``scan``, ``map`` of ``torch._higher_order_ops``) -> their eager (dense)
    implementations. Not ``associative_scan``: torch's eager form runs its combine under ``vmap``,
    which the device products refuse."""
    import importlib

    found: dict[Any, Any] = {}
    for mod, op, dense in (("cond", "cond", "cond_op_dense"), ("while_loop", "while_loop", "while_loop_dense"),
                           ("scan", "scan", "scan_op_dense"), ("map", "map_impl", "map_dense")):
        try:
            m = importlib.import_module(f"torch._higher_order_ops.{mod}")
            found[getattr(torch.ops.higher_order, op)] = getattr(m, dense)
        except (ImportError, AttributeError):  # an older torch without it
            continue
    return found


_CONTROL_FLOW = _control_flow()


def answer_control_flow(func: Any, args: tuple, kwargs: dict) -> Any:
    """``torch.cond(pred, true_fn, false_fn, operands)`` or ``while_loop(cond_fn, body_fn, carried)``
    inside a converted module: torch's own eager implementation runs the branch (or the loop) with
    :class:`AnalogMode` pushed back on torch's stack (torch takes a mode off while it answers a call),
    so their products are device products of the running module, counted and named as any other
    (inside an excluded module each is counted digital, as any product there). The call itself is
    no product: :class:`AnalogMode` answers it before looking for a family.
    Before session 18 torch compiled the call (:func:`_eager_control_flow`) and its products ran in
    float32, unnamed and uncounted."""
    mode = next((f.mode for f in _stack() if f.mode is not None), None)
    dense = _CONTROL_FLOW[func]
    if mode is None:
        return dense(*args, **kwargs)
    torch._C._push_on_torch_function_stack(mode)
    try:
        return dense(*args, **kwargs)
    finally:
        _leave_mode_above(mode)


def _leave_mode_above(mode: "AnalogMode") -> None:
    """Pop ``mode`` (pushed by :func:`answer_control_flow`) and any mode left above it."""
    while torch._C._len_torch_function_stack() > 0:
        if torch._C._pop_torch_function_stack() is mode:
            return


def _eager_control_flow() -> None:
    """torch runs ``torch.cond`` and ``while_loop`` in eager mode through ``torch.compile``
    (``torch._higher_order_ops.utils._hop_compile_and_call``), where the function mode never answers
    their products; while a converted model runs in this thread (and dynamo is not tracing) they are
    called eagerly instead, so that :func:`answer_control_flow` answers them. Installed once, the first
    time a converted model runs; elsewhere (other threads, no converted model) torch's own call."""
    try:
        import torch._higher_order_ops.utils as hop_utils
    except ImportError:  # pragma: no cover - an older torch
        return
    torch_call = getattr(hop_utils, "_hop_compile_and_call", None)
    if torch_call is None or getattr(torch_call, "abfp_eager", False):
        return

    def call(fn: Any, args: tuple, kwargs: dict | None = None) -> Any:
        if not torch.compiler.is_dynamo_compiling() and _mode_running(_stack()):
            return fn(*args, **(kwargs or {}))
        return torch_call(fn, args, kwargs)

    call.abfp_eager = True  # type: ignore[attr-defined]
    hop_utils._hop_compile_and_call = call


class AnalogMode(TorchFunctionMode):
    """Answers product calls with the device while converted modules run."""

    _flex_before: Any = None

    def __enter__(self):  # flex_attention calls its operator eagerly, where this mode answers it
        # (restored when the mode is left: :func:`_leave_mode`); so do torch.cond and while_loop
        self._flex_before = flex_eager()
        if _CONTROL_FLOW and not torch.compiler.is_dynamo_compiling():
            _eager_control_flow()
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dynamo = torch.compiler.is_dynamo_compiling()
        if not dynamo and func in _PLAIN:  # not a product (the common case: answered with the least Python;
            return func(*args, **kwargs)   # not under dynamo, which would guard on the set while it grows)
        stack = _stack()
        if not stack:
            return func(*args, **kwargs)
        if func in _CONTROL_FLOW and not dynamo:  # torch.cond, while_loop: their branches run under this mode
            return answer_control_flow(func, args, kwargs)
        handler = handler_for(func)
        name = no_analog_model(func) if handler is None else None
        if handler is None and name is None:  # not a product
            if not dynamo:
                _PLAIN.add(func)
            return func(*args, **kwargs)
        if not dynamo:
            drop_stale(stack, sys._getframe(1))
        if not stack:
            return func(*args, **kwargs)
        frame = stack[-1]
        if not dynamo and frame.module is not None and frame.module._modules:
            added = _unconverted_below(frame.module, frame.name)
            if added is not None:  # its products would run under this module's name and device
                owner = repr(frame.name) if frame.name else "the root"
                if "parametrizations" in added.split("."):  # torch.nn.utils.parametrize's ParametrizationList
                    raise ValueError(f"abfp: a weight parametrization ({added!r}, torch.nn.utils.parametrize or "
                                     "torch.nn.utils.parametrizations) was registered after abfp.convert: its weight "
                                     f"preparation would run on the device as products of {owner}; register it "
                                     "before abfp.convert, or convert the model again after registering it "
                                     "(abfp.convert(model, config, ...)), which prepares the weight digitally")
                raise ValueError(f"abfp: module {added!r} was added or replaced after abfp.convert: its products would "
                                 f"run as products of {owner}, with that module's device, exclusion and overrides; "
                                 "convert the model again (abfp.convert(model, config, ...)) after changing it")
        direct = frame.state.direct
        if direct is not None and frame.module in direct.leaf and direct.active():
            return func(*args, **kwargs)  # a leaf site: its wrapper answers
        if handler is None:
            warn_digital(frame, name)
            return digital_call(frame, func, args, kwargs, "no analog model")
        if frame.state.config_for(frame.name) is None and frame.name not in frame.state.reincluded:
            return digital_call(frame, func, args, kwargs, "excluded module")
        if any(isinstance(a, MaskedTensor) for a in args) or any(isinstance(a, MaskedTensor) for a in kwargs.values()):
            # before the family's handler, which may reshape it first (einsum): torch's own words name no product
            raise masked_operand(f"abfp: {func_name(func)} (module {frame.name or 'the root'!r})")
        check_call_dtypes(frame, func, args, kwargs)
        layout = odd_layout(args, kwargs)
        if layout is not None:  # a sparse operand (a graph's adjacency, ...) or a nested one
            return answer_odd_layout(frame, handler, func, args, kwargs, layout)
        try:
            return handler(frame, func, args, kwargs)
        except NotTraceable:
            # the tracer unwinds without the wrappers popping: leave no frame and no mode behind
            while stack:
                _pop(stack)
            raise
