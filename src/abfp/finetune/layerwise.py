"""Label-free layer-wise reconstruction: bias correction.

The device's error at a converted linear or convolution module has a systematic part, the
same for every input: the mean, per output channel, of ``y_device - y_fp32``. Weight
quantisation (8-bit DACs) and the ADC's rounding of small gained products make it nonzero, and
on depthwise convolutions (9 weights per channel) it is large against the signal. It is what
the classic post-training-quantisation *bias correction* removes: measure it on calibration
inputs and subtract it from the module's bias. No labels, no gradients, one device pass.

:func:`bias_correct` takes the modules in the order the model runs them, upstream ones
already on the device *and already corrected*: the target of module ``m`` is the float32
model's output of ``m`` on the float32 inputs, so a module's correction also absorbs the mean
error its (corrected) upstream passes down to it. All of this happens in one forward pass of
``samples`` calibration inputs (evenly spread over them) as a single batch through the
converted model: a hook at
each module measures ``e[c] = mean(y_device[..., c]) - mean(y_fp32[..., c])`` (the float32
means from a float32 pass over the same inputs) and removes it from the output before the next
module sees it. The result is a float32 copy of the model with the corrections folded in:

* a module with a bias: ``bias -= e``;
* a module without one whose output goes straight into a ``BatchNorm`` in eval mode (conv ->
  BN, as in EfficientNet and MobileNet): ``bn.running_mean += e``, which is the same
  (``(y - e - mu) / s = (y - (mu + e)) / s``), so the model keeps its architecture and its
  ``state_dict`` keys (``abfp eval --plan --weights`` loads it);
* anything else is left alone and listed in ``skipped`` with the reason (no bias and no batch
  norm after it, a module run more than once per forward, a product module that is not a
  linear layer or a convolution, such as attention).

The pass's device noise is one draw (``seed``); the noise is zero-mean, and each channel's
mean is over ``samples x`` (output positions) values, so what is corrected is the systematic
error. Memory: the pass holds one batch of ``samples`` inputs (default 64).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..config import ABFPConfig
from ..nn import convert
from ..nn.convert import analog_state, digital, needs_calibration, product_free
from .distillation import as_inputs

__all__ = ["BiasCorrection", "bias_correct", "channel_mean_errors"]


@dataclass
class BiasCorrection:
    """What :func:`bias_correct` returns.

    ``model``: the corrected float32 copy. ``corrections``: per corrected module, the per-channel
    mean device error ``e`` that was removed. ``targets``: per corrected module, the parameter or
    buffer it went into (``"fc.bias"``, ``"bn1.running_mean"``). ``skipped``: module -> why it
    was not corrected. ``relative_error``: per corrected module, ``rms_c(e[c]) / rms(y_fp32)``
    before its correction. ``samples``: the calibration inputs used."""

    model: nn.Module
    corrections: dict[str, Tensor] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    relative_error: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def describe(self) -> dict[str, Any]:
        return {"corrected": len(self.corrections), "skipped": dict(self.skipped), "samples": self.samples,
                "relative_error": dict(self.relative_error)}


def spread(n: int, samples: int) -> Tensor:
    """``min(samples, n)`` indices evenly spread over ``range(n)``, first and last included (calibration
    sets are often in blocks: crops of one photo, sentences of one source; the first ``samples``
    would see only the first blocks)."""
    k = min(samples, n)
    if k == n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k, dtype=torch.float64).round().long()


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, _ConvNd) else -1


def _channel_mean(y: Tensor, dim: int) -> Tensor:
    """Mean of ``y`` over every axis but ``dim``, in float64."""
    y = y.detach().double().movedim(dim, -1)
    return y.reshape(-1, y.shape[-1]).mean(0)


def _broadcast(e: Tensor, y: Tensor, dim: int) -> Tensor:
    """``e`` (one value per channel) shaped to broadcast against ``y`` along ``dim``."""
    shape = [1] * y.dim()
    shape[dim] = -1
    return e.to(y.dtype).reshape(shape)


def _candidates(model: nn.Module) -> list[str]:
    """Converted linear layers and convolutions, in ``named_modules`` order."""
    state = analog_state(model)
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, _ConvNd)) and state.config_for(n) is not None]


@torch.no_grad()
def _float32_pass(model: nn.Module, names: Sequence[str], inputs: tuple[Tensor, ...], batch_size: int
                  ) -> tuple[dict[str, Tensor], dict[str, float], dict[str, int], dict[str, str]]:
    """Per module of ``names``: the float32 output's channel means, its rms, how often it runs
    per forward, and the batch norm (name) its output goes straight into, if any."""
    mods = dict(model.named_modules())
    names_of = {id(mods[n]): n for n in names}
    sums: dict[str, Tensor] = {}
    squares: dict[str, float] = {}
    counts: dict[str, int] = {}
    calls: dict[str, int] = {n: 0 for n in names}
    outputs: dict[int, tuple[str, Tensor]] = {}
    consumer: dict[str, str] = {}
    first = [True]

    def after(module: nn.Module, args: Any, out: Any) -> None:
        name = names_of[id(module)]
        if not isinstance(out, Tensor) or out.dim() < 2:
            calls[name] = -1 << 30  # not a plain tensor output: never corrected
            return
        if first[0]:
            calls[name] += 1
            outputs[id(out)] = (name, out)  # the tensor is kept alive: its id cannot be reused
        y = out.detach().double().movedim(_channel_dim(module), -1)
        y = y.reshape(-1, y.shape[-1])
        sums[name] = sums.get(name, 0) + y.sum(0)
        squares[name] = squares.get(name, 0.0) + float((y * y).sum())
        counts[name] = counts.get(name, 0) + y.shape[0]

    def before_bn(bn_name: str):
        def hook(module: nn.Module, args: Any) -> None:
            if first[0] and args and isinstance(args[0], Tensor) and id(args[0]) in outputs:
                src, t = outputs[id(args[0])]
                if t is args[0]:
                    consumer.setdefault(src, bn_name)
        return hook

    handles = [mods[n].register_forward_hook(after) for n in names]
    handles += [m.register_forward_pre_hook(before_bn(n)) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    try:
        n = int(inputs[0].shape[0])
        for i in range(0, n, batch_size):
            model(*(t[i:i + batch_size] for t in inputs))
            first[0] = False
            outputs.clear()
    finally:
        for h in handles:
            h.remove()
    means = {k: sums[k] / counts[k] for k in sums}
    rms = {k: math.sqrt(squares[k] / (counts[k] * means[k].numel())) for k in sums}
    return means, rms, calls, consumer


def bias_correct(model: nn.Module, inputs: Any, config: ABFPConfig | None = None, *,
                 overrides: Mapping[str, ABFPConfig] | None = None, exclude: Sequence[str] = (),
                 samples: int = 64, seed: int = 0, batch_size: int = 64,
                 target: Literal["float32", "local"] = "float32") -> BiasCorrection:
    """Bias-correct ``model`` for the device ``config`` (``overrides``: per-module devices, e.g.
    ``DevicePlan.overrides()``; ``exclude``: modules kept digital) on ``samples`` of ``inputs``
    evenly spread over them (:func:`spread`; unlabelled: a tensor, a tuple of tensors or a Dataset). Returns a
    :class:`BiasCorrection` whose ``model`` is a corrected float32 copy (``model`` is not
    changed); see the module docstring. ``seed``: the device noise of the pass (when the
    configs have none); ``batch_size``: of the float32 pass only.
    ``target``: ``"float32"`` (default) matches each module's mean output to the float32 model's
    on the float32 inputs (the correction absorbs the mean error passed down from upstream);
    ``"local"`` is the classic per-layer correction, the module's own mean error on the inputs
    it gets on the device, ``mean(device(x)) - mean(float32(x))`` (a linear module's float32 mean
    is the module applied to the batch mean of its input).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bias_correct needs an nn.Module, got {type(model).__name__}")
    for name, v in (("samples", samples), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if target not in ("float32", "local"):
        raise ValueError(f"target must be 'float32' or 'local', got {target!r}")
    config = config or ABFPConfig()
    if config.mode != "abfp":
        raise ValueError("bias_correct corrects ABFP devices: config.mode must be 'abfp'")
    data = as_inputs(inputs)
    if len(data) < 1:
        raise ValueError("bias_correct needs at least one calibration input")
    x = tuple(t[spread(len(data), samples)] for t in data.inputs)

    result_model = copy.deepcopy(model).eval()
    device_model = convert(copy.deepcopy(model).eval(),
                           config if config.seed is not None else config.replace(seed=seed),
                           exclude=exclude, inplace=True,
                           overrides={k: v if v.seed is not None else v.replace(seed=seed)
                                      for k, v in (overrides or {}).items()} or None)
    if needs_calibration(device_model):  # pragma: no cover - fixed point is refused above
        raise ValueError("bias_correct corrects ABFP devices")
    names = _candidates(device_model)
    means, rms, calls, consumer = _float32_pass(result_model, names, x, batch_size)

    out = BiasCorrection(result_model, samples=int(x[0].shape[0]))
    state = analog_state(device_model)
    for n, m in device_model.named_modules():
        if state.config_for(n) is not None and n not in names and not product_free(m) \
                and not isinstance(m, (nn.Embedding, nn.EmbeddingBag)) \
                and any(True for _ in m.parameters(recurse=False)):  # look-ups are digital: nothing to correct
            out.skipped[n] = f"a {type(m).__name__}: only linear layers and convolutions are corrected"
    dev_mods = dict(device_model.named_modules())
    res_mods = dict(result_model.named_modules())
    active: list[str] = []
    for n in names:
        mod = res_mods[n]
        if calls.get(n, 0) != 1:
            out.skipped[n] = ("it did not run on the calibration inputs" if calls.get(n, 0) == 0 else
                              "its output is not a plain tensor" if calls[n] < 0 else
                              f"it runs {calls[n]} times per forward")
        elif getattr(mod, "bias", None) is not None:
            out.targets[n] = f"{n}.bias"
            active.append(n)
        elif n in consumer and isinstance(res_mods[consumer[n]], _BatchNorm) \
                and res_mods[consumer[n]].running_mean is not None:
            out.targets[n] = f"{consumer[n]}.running_mean"
            active.append(n)
        else:
            out.skipped[n] = "no bias, and its output does not go straight into a batch norm with running statistics"

    pending: dict[str, Tensor] = {}  # BN name -> the correction its input is waiting for

    def after(name: str):
        def hook(module: nn.Module, args: Any, y: Tensor) -> Tensor | None:
            dim = _channel_dim(module)
            if target == "local":
                x0 = args[0].detach()
                x0 = x0.mean(0, keepdim=True) if isinstance(module, _ConvNd) else x0.reshape(-1, x0.shape[-1]).mean(0)
                with digital(device_model):
                    want = _channel_mean(res_mods[name](x0.reshape(1, -1) if x0.dim() == 1 else x0), dim)
            else:
                want = means[name]
            e = _channel_mean(y, dim) - want
            out.corrections[name] = e.float()
            out.relative_error[name] = float(e.pow(2).mean().sqrt()) / rms[name] if rms[name] > 0 else 0.0
            if out.targets[name].endswith(".bias"):
                return y - _broadcast(e, y, dim)
            pending[consumer[name]] = e  # the batch norm subtracts it, as the folded running mean will
            return None
        return hook

    def before_bn(bn_name: str):
        def hook(module: nn.Module, args: Any) -> tuple[Tensor, ...] | None:
            e = pending.pop(bn_name, None)
            if e is None:
                return None
            return (args[0] - _broadcast(e, args[0], 1), *args[1:])
        return hook

    handles = [dev_mods[n].register_forward_hook(after(n)) for n in active]
    handles += [dev_mods[consumer[n]].register_forward_pre_hook(before_bn(consumer[n]))
                for n in active if not out.targets[n].endswith(".bias")]
    try:
        with torch.no_grad():
            device_model(*x)
    finally:
        for h in handles:
            h.remove()

    with torch.no_grad():
        for n in active:
            e = out.corrections[n]
            if out.targets[n].endswith(".bias"):
                b = res_mods[n].bias
                b.sub_(e.to(b.dtype))
            else:
                rm = res_mods[consumer[n]].running_mean
                rm.add_(e.to(rm.dtype))
    return out


@torch.no_grad()
def channel_mean_errors(model: nn.Module, inputs: Any, config: ABFPConfig | None = None, *,
                        overrides: Mapping[str, ABFPConfig] | None = None, exclude: Sequence[str] = (),
                        reference: nn.Module | None = None, batch_size: int = 64) -> dict[str, Tensor]:
    """Per converted linear layer / convolution of ``model`` on ``config``: the per-channel mean of
    ``y_device - y_ref`` on ``inputs``, where ``y_ref`` is ``reference``'s (default: ``model``'s)
    float32 output of the same module on the same inputs (a measurement, for tests and reports).
    A module whose correction went into the batch norm after it is measured there: the error of
    the batch norm's input, ``(y - running_mean)`` compared with the reference's."""
    config = config or ABFPConfig()
    data = as_inputs(inputs)
    x = data.inputs
    ref = copy.deepcopy(reference if reference is not None else model).eval()
    dev = convert(copy.deepcopy(model).eval(), config, exclude=exclude, overrides=overrides, inplace=True)
    names = _candidates(dev)

    def centred(m: nn.Module) -> dict[str, Tensor]:
        means, _, _, consumer = _float32_pass(m, names, x, batch_size)
        mods = dict(m.named_modules())
        for n, bn in consumer.items():
            rm = mods[bn].running_mean
            if rm is not None and getattr(mods[n], "bias", None) is None:
                means[n] = means[n] - rm.double()
        return means

    if not names:
        return {}
    have, want = centred(dev), centred(ref)
    return {n: (have[n] - want[n]).float() for n in names if n in have and n in want}
