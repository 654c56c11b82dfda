"""``convert`` a model to run its products on the device, ``to_digital`` to undo it.

Modules are not replaced: each gets an instance-level ``forward`` that pushes its frame, calls
its own and pops the frame, also when it raises (see :mod:`abfp.nn.mode`; no hooks, so torch
calls the module on its fast path), except the torch modules
whose forward makes no product (:data:`_PRODUCT_FREE`: activations, norms, pooling, dropout,
``nn.Sequential``; not the root), so parameters, buffers,
``state_dict`` keys, subclasses and what their ``forward`` computes stay as they were, and a
converted model's ``state_dict`` loads into the original model and back.
"""

from __future__ import annotations

import copy
import re
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList
from torch.nn.utils.spectral_norm import SpectralNorm

from ..config import ABFPConfig, ExecutionOptions
from .mode import (_PRODUCT_FREE, DigitalSpectralNorm, GuardedForward, GuardedMethod,  # noqa: F401  (re-exported)
                   RootCall, computing_methods, product_free)
from .state import AnalogState, _matches, is_site_pattern, normalise_overrides, site_pattern_names_a_module

STATE_ATTR = "abfp_state"

def convert(
    model: nn.Module,
    config: ABFPConfig | None = None,
    *,
    exclude: Sequence[str] = (),
    overrides: Mapping[str, ABFPConfig] | None = None,
    inplace: bool = False,
    include_matmul: bool = True,
    execution: ExecutionOptions | None = None,
) -> nn.Module:
    """Run ``model``'s linear, convolution and (with ``include_matmul``) activation-by-activation
    products on the device described by ``config``.

    ``exclude``: module names or regular expressions (full match) kept digital, with
    everything inside them. ``overrides``: module name or regex -> its own config (wins over
    ``exclude``; inherited by submodules), or a product site or a regex over site names
    (``"attn:matmul1"``: that product alone; see :mod:`abfp.nn.state`). ``inplace=False``
    converts a deep copy.
    ``execution``: how every product runs (:class:`~abfp.config.ExecutionOptions`: kernel,
    noise seed), replacing ``config.execution`` and the overrides' (``None``: each keeps its own).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert needs an nn.Module, got {type(model).__name__}")
    config = config or ABFPConfig()
    if not isinstance(config, ABFPConfig):
        raise TypeError(f"config must be an ABFPConfig, got {type(config).__name__}")
    if not isinstance(include_matmul, bool):
        raise TypeError(f"include_matmul must be True or False, got {include_matmul!r}")
    config, overrides = _with_execution(config, overrides, execution)
    exclude = _patterns(exclude)
    scripted = next(((n or "the root", m) for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)),
                    None)
    if scripted is not None:  # its forward is TorchScript: no Python of ours runs in it, its products are out of sight
        raise TypeError(f"module {scripted[0]!r} is a TorchScript module ({type(scripted[1]).__name__}): "
                        "its products run inside TorchScript, where abfp can neither reach nor count them; convert "
                        "the Python module (torch.jit.trace of a converted model works)")
    _check_not_nested(model)
    _check_no_compiled_attention(model)
    if is_converted(model):
        model = to_digital(model, inplace=inplace)
        inplace = True
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except RuntimeError as e:  # e.g. a weight computed by a torch.nn.utils.weight_norm hook
            raise ValueError(f"convert(..., inplace=False) converts a copy of the model, and torch cannot copy this "
                             f"one ({str(e).splitlines()[0]}); convert it in place: convert(model, config, "
                             "inplace=True)") from e
    modules = dict(model.named_modules())
    names = list(modules)
    state = AnalogState(
        config=config,
        exclude=tuple(exclude),
        overrides=overrides,
        include_matmul=include_matmul,
    )
    _check_patterns(state, modules)
    state.resolve(names)
    prepared = [n for n, m in model.named_modules() if isinstance(m, ParametrizationList)]
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if type(hook) is SpectralNorm:  # the hook form of spectral norm prepares the weight
                hook.__class__ = DigitalSpectralNorm
        if name and product_free(module):  # no frame needed (the root always gets one: it enters the mode once)
            continue
        preparing = any(name == p or name.startswith(p + ".") for p in prepared)
        module.forward = GuardedForward(module, module.__dict__.get("forward"), name, state, weight_preparation=preparing)
        if not preparing:
            for attr, fn in computing_methods(module):  # encode_text & co. called from outside: as forward
                setattr(module, attr, GuardedMethod(module, fn, name, state))
    RootCall.install(model)  # the root's hooks run inside its frame (torch runs them outside its forward)
    setattr(model, STATE_ATTR, state)
    return model


def _patterns(exclude: str | Iterable[str] | None) -> tuple[str, ...]:
    """``exclude`` as a tuple of module names or patterns (a str is one; ``None``: none)."""
    if exclude is None:
        return ()
    out = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    bad = [e for e in out if not isinstance(e, str)]
    if bad:
        raise TypeError(f"exclude takes module names or regular expressions (str), got {bad[0]!r}")
    return out


def check_patterns(model: nn.Module, *, exclude: Sequence[str] = (),
                   overrides: Mapping[str, ABFPConfig] | None = None) -> None:
    """Raise ValueError as :func:`convert` would for these ``exclude`` and ``overrides`` patterns
    on ``model``, without converting anything (tools check a plan before their work starts)."""
    _check_patterns(AnalogState(config=ABFPConfig(), exclude=_patterns(exclude), overrides=normalise_overrides(overrides)),
                    dict(model.named_modules()))


def _check_no_compiled_attention(model: nn.Module) -> None:
    """Refuse a Hugging Face model set to ``attn_implementation="flex_attention"``: it calls its own
    ``torch.compile(flex_attention)``, and a compiled graph's products run out of abfp's sight
    (float32, counted nowhere). abfp simulates the same model's ``"sdpa"`` and ``"eager"``
    attention, and ``flex_attention`` called eagerly (``ops.attention.flex``)."""
    for name, m in model.named_modules():
        if getattr(getattr(m, "config", None), "_attn_implementation", None) == "flex_attention":
            raise ValueError(f"module {name or 'the root'!r} uses Hugging Face's compiled flex_attention "
                             "(attn_implementation='flex_attention'): its attention products would run in float32, "
                             "compiled, out of abfp's sight and counted nowhere; load the model with "
                             "attn_implementation='sdpa' (or 'eager'), which abfp simulates, or call "
                             "model.set_attn_implementation('sdpa') before convert")


def _check_not_nested(model: nn.Module) -> None:
    """Refuse a model that holds a converted module, or is a module of a converted model: its
    products would run with the other conversion's device and state, out of this one's sight
    (``summary``, ``coverage``, ``to_digital``). A converted model itself is re-converted."""
    if is_converted(model):
        return
    for name, m in model.named_modules():
        if is_converted(m) or isinstance(m.__dict__.get("forward"), GuardedForward):
            if not name:
                raise ValueError("this module is part of a converted model (abfp.convert was called on a model that "
                                 "holds it): convert that model, with an override naming this module for its own "
                                 "device, or call abfp.to_digital on that model first")
            raise ValueError(f"module {name!r} is converted already (abfp.convert was called on it): convert the whole "
                             f"model once, with overrides={{{name!r}: config}} to give it its own device, or call "
                             f"abfp.to_digital on it first")


def _with_execution(config: ABFPConfig, overrides: Mapping[str, ABFPConfig] | None,
                    execution: ExecutionOptions | None) -> tuple[ABFPConfig, dict[str, ABFPConfig]]:
    """``config`` and the overrides run with ``execution`` (unchanged when it is ``None``)."""
    overrides = normalise_overrides(overrides)
    if execution is None:
        return config, overrides
    if not isinstance(execution, ExecutionOptions):
        raise TypeError(f"execution must be an ExecutionOptions, got {type(execution).__name__}")
    return config.with_execution(execution), {k: v.with_execution(execution) for k, v in overrides.items()}


def _check_patterns(state: AnalogState, modules: Mapping[str, nn.Module]) -> None:
    """Every exclude and override pattern names a module, or (an override) a site of one; a
    module override names at least one module that can make a product (not only activations,
    norms, pooling: :func:`product_free` modules without children, whose config nothing reads)."""
    names = list(modules)
    for pattern in list(state.exclude) + list(state.overrides):
        try:
            re.compile(pattern)
        except re.error as e:
            if pattern not in names:
                raise ValueError(f"{pattern!r} is neither a module name of the model nor a valid regular expression "
                                 f"({e})") from None
        if pattern in state.overrides and is_site_pattern(pattern, names):
            if not site_pattern_names_a_module(pattern, names):
                raise ValueError(f"override {pattern!r} names product sites of no module of the model; sites look "
                                 f"like '<module name>:<op><index>' (e.g. {names[-1]!r}:linear0)")
        elif not any(_matches(n, pattern) for n in names):
            raise ValueError(f"{pattern!r} matches no module of the model; module names look like {names[1:4]}")
        elif pattern in state.overrides and all(product_free(m) and next(m.children(), None) is None
                                                for n, m in modules.items() if _matches(n, pattern)):
            hit = [f"{n} ({type(m).__name__})" for n, m in modules.items() if _matches(n, pattern)]
            raise ValueError(f"override {pattern!r} names only modules that compute no product ({', '.join(hit[:3])}"
                             f"{', ...' if len(hit) > 3 else ''}): an override sets the device of a module's products "
                             "(and its submodules'); name the layer whose products it should set")


def set_config(
    model: nn.Module,
    config: ABFPConfig,
    *,
    overrides: Mapping[str, ABFPConfig] | None = None,
    exclude: Sequence[str] | None = None,
    execution: ExecutionOptions | None = None,
) -> nn.Module:
    """Point a converted model at another device config (and overrides) without re-converting;
    ``execution`` as in :func:`convert`. Patterns are checked as :func:`convert` checks them,
    before anything changes: a bad one raises and leaves the model as it was."""
    state = analog_state(model)
    if not isinstance(config, ABFPConfig):
        raise TypeError(f"config must be an ABFPConfig, got {type(config).__name__}")
    config, overrides_ = _with_execution(config, overrides, execution)
    exclude = state.exclude if exclude is None else _patterns(exclude)
    modules = dict(model.named_modules())
    names = list(modules)
    _check_patterns(AnalogState(config=config, exclude=exclude, overrides=overrides_), modules)
    state.config, state.overrides, state.exclude = config, overrides_, exclude
    state.resolve(names)
    state.reseed(0)
    return model


def is_converted(model: nn.Module) -> bool:
    return isinstance(getattr(model, STATE_ATTR, None), AnalogState)


def analog_state(model: nn.Module) -> AnalogState:
    """The :class:`AnalogState` of a converted model (ValueError if it was not converted)."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, AnalogState):
        raise ValueError("this model is not converted: call abfp.convert(model, config) first")
    return state


def to_digital(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Undo :func:`convert`: every product runs digitally again."""
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if type(hook) is DigitalSpectralNorm:
                hook.__class__ = SpectralNorm
        RootCall.uninstall(module)
        for attr in [k for k, v in module.__dict__.items() if isinstance(v, GuardedMethod)]:
            delattr(module, attr)
        guard = module.__dict__.get("forward")
        if isinstance(guard, GuardedForward):
            if guard.inner is None:
                del module.forward
            else:
                module.forward = guard.inner
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)
    return model


@contextmanager
def digital(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run a converted model digitally (float32), e.g. for a reference pass."""
    state = analog_state(model)
    saved = dict(state.module_configs)
    try:
        for k in state.module_configs:
            state.module_configs[k] = None
        yield model
    finally:
        state.module_configs.update(saved)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    percentile: float = 100.0,
) -> dict[str, list[float]]:
    """Static activation scales for the fixed-point baseline (SPEC section 2).

    Runs ``model`` in float32 (eval mode, batch-norm statistics untouched) on ``batches`` (each
    a tensor, a tuple of model inputs, or a mapping of keyword inputs such as a tokenizer's
    output, ``model(**batch)``) and records, per product site and operand, the
    ``percentile`` of |operand| within each call (100: the max), keeping the largest over all
    calls and batches. Returns ``{site: [first operand's scale, second operand's]}``.

    Fixed-mode products then use these scales: a product with weights uses the first (its
    input's) and keeps the weights' own static scale, max |W|; a product of two activations
    (``matmul``) uses both. A fixed-mode product whose site was not calibrated raises
    ``ValueError`` (it never falls back to each call's own max, which would make the baseline
    dynamic).
    """
    with calibrating(model, percentile) as state:
        n = 0
        for batch in batches:
            if isinstance(batch, Mapping):  # keyword inputs: a tokenizer's output, {"input_ids": ..., ...}
                model(**batch)
            else:
                model(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
            n += 1
        if n == 0:  # the scales would all be gone (raised inside: the model keeps the ones it had)
            raise ValueError("calibrate needs at least one batch of inputs, got none")
    zero = sorted(site for site, scales in state.input_scales.items() if any(s == 0 for s in scales if s is not None))
    if zero:
        warnings.warn(f"abfp.calibrate: product site(s) {zero[:4]}{' ...' if len(zero) > 4 else ''} saw only zeros in "
                      "the calibration batches: a static scale of 0 encodes every later input as 0 (calibrate on "
                      "inputs like the ones the model will see)", UserWarning, stacklevel=3)
    return dict(state.input_scales)


@contextmanager
def calibrating(model: nn.Module, percentile: float = 100.0) -> Iterator[AnalogState]:
    """While inside, calls of ``model`` (however it is called: keyword arguments too) record the
    static scales of :func:`calibrate` (cleared on entry), in eval mode, without gradients. An
    exception inside puts the scales the model had back (a half-finished calibration would
    leave scales from the first batches only, used silently by the next forward)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    state = analog_state(model)
    before = {k: list(v) for k, v in state.input_scales.items()}
    percentile_before = state.calibration_percentile
    state.input_scales.clear()
    state.calibrating = True
    state.calibration_percentile = percentile
    was_training = model.training
    model.eval()  # calibration must not move batch-norm statistics
    try:
        with torch.no_grad():
            yield state
    except BaseException:
        state.input_scales.clear()
        state.input_scales.update(before)
        state.calibration_percentile = percentile_before
        raise
    finally:
        state.calibrating = False
        model.train(was_training)


def needs_calibration(model: nn.Module) -> bool:
    """Whether a converted model has fixed-point products and no calibrated scales yet (its
    forward would raise: call :func:`calibrate` first)."""
    state = analog_state(model)
    return not state.input_scales and any(c is not None and c.mode == "fixed"
                                       for c in [*state.module_configs.values(), *state.overrides.values()])


def reseed(model: nn.Module | None = None, offset: int = 0) -> None:
    """Restart the device-noise streams of a converted model, or without a model those of seeded
    :mod:`abfp.functional` calls, at ``seed * 1_000_003 + offset`` (see :mod:`abfp.noise_keys`):
    the same sequence of products after it draws the same noise."""
    if model is None:
        from ..noise_keys import FUNCTIONAL_STREAMS

        FUNCTIONAL_STREAMS.restart(offset)
        return
    analog_state(model).reseed(offset)
