"""A gain per layer: the one that minimises the layer's output error (or today's saturation rule).

Error rule (default): the calibration batch runs once through the model on the device, with
the device noise. At each analog product, in execution order, the product is computed at every
candidate gain ``G`` and its relative error against float32 on the same inputs,
``||Y_G - Y_fp32|| / ||Y_fp32||``, is measured; the module gets the gain with the least error
(``tolerance > 0``: the smallest gain within ``(1 + tolerance)`` times the least error, since a
gain ``G`` costs ``G`` times the analog energy), and the product continues with it, so every
later layer is chosen with its upstream layers already on the device (greedy, front to back). A
module with several products (attention's two matmuls) is decided by its first one.

Saturation rule (``rule="saturation"``, :func:`abfp.evaluate.autogain.choose_gains`): the
largest power of two whose noise-free saturated fraction stays at most ``threshold``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..config import ABFPConfig
from ..nn import analog_state, convert, reseed
from ..evaluate.autogain import choose_gains as saturation_gains

__all__ = ["GainRule", "choose_gains", "power_of_two_gains", "GreedyGain", "intercepted_forward", "scored_output"]

GainRule = Literal["error", "saturation", "energy"]


def power_of_two_gains(max_gain: float = 256.0, per_octave: int = 1) -> list[float]:
    """``1, 2, 4, ..., max_gain`` (powers of two up to ``max_gain``); ``per_octave > 1``:
    ``2 ** (j / per_octave)`` (e.g. 2: ``1, 1.414, 2, 2.828, 4, ...``), arbitrary gains."""
    if not (isinstance(max_gain, (int, float)) and math.isfinite(max_gain) and max_gain >= 1):
        raise ValueError(f"max_gain must be a finite number >= 1, got {max_gain!r}")
    if isinstance(per_octave, bool) or not isinstance(per_octave, int) or per_octave < 1:
        raise ValueError(f"gains per octave must be an integer >= 1, got {per_octave!r}")
    out, j = [], 0
    while 2.0 ** (j / per_octave) <= max_gain * (1 + 1e-12):
        out.append(2.0 ** (j / per_octave))
        j += 1
    return out


def _check_candidates(candidates: Sequence[float]) -> list[float]:
    vals = list(candidates)
    if not vals:
        raise ValueError("gain candidates: empty list")
    for g in vals:
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0:
            raise ValueError(f"gain candidates must be finite numbers > 0, got {g!r}")
    return sorted({float(g) for g in vals})


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    r = ref.detach().double()
    den = float((r * r).sum())
    num = float(((y.detach().double() - r) ** 2).sum())
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


class GreedyGain:
    """Interceptor of the error rule: per module, the first product tries every candidate gain
    and keeps the best; ``chosen[module]`` the gain, ``errors[module][G]`` the measured errors."""

    def __init__(self, candidates: Sequence[float], tolerance: float = 0.0) -> None:
        self.candidates = _check_candidates(candidates)
        self.tolerance = float(tolerance)
        self.chosen: dict[str, float] = {}
        self.errors: dict[str, dict[float, float]] = {}

    def __call__(self, call: Any) -> torch.Tensor:
        module = call.site.rsplit(":", 1)[0]
        g = self.chosen.get(module)
        if g is None:
            ref = call.digital()
            errs = {c: _relative_error(call.analog(call.config.replace(gain=c)), ref) for c in self.candidates}
            best = min(errs.values())
            g = min(c for c, e in errs.items() if e <= best * (1.0 + self.tolerance))
            self.chosen[module], self.errors[module] = g, errs
        return call.analog(call.config.replace(gain=g))


def scored_output(out: Any) -> torch.Tensor:
    """The tensor a metric scores of a model's output: the output itself, or the first tensor of a
    tuple, a dict, a Hugging Face ``ModelOutput`` (``logits``), as ``abfp eval`` scores it
    (:func:`abfp.evaluate.runner._first_tensor`)."""
    from ..evaluate.runner import _first_tensor

    return _first_tensor(out)


def intercepted_forward(converted: nn.Module, inputs: tuple[torch.Tensor, ...], interceptor: Any) -> torch.Tensor:
    """The scored output (:func:`scored_output`) of ``converted(*inputs)`` with ``interceptor`` on
    every product, noise streams reseeded to 0."""
    state = analog_state(converted)
    state.interceptors["*"] = interceptor
    reseed(converted, 0)
    try:
        return scored_output(converted(*inputs))
    finally:
        state.interceptors.pop("*", None)


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise TypeError(f"calibration inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}")


@torch.no_grad()
def choose_gains(
    model: nn.Module,
    calibration_inputs: Any,
    config: ABFPConfig,
    *,
    rule: GainRule = "error",
    candidates: Sequence[float] | None = None,
    max_gain: float = 256.0,
    tolerance: float = 0.0,
    threshold: float = 1e-4,
    exclude: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, float]:
    """Module name -> gain, for the float32 ``model`` (not modified) on ``config``'s device.

    ``candidates``: the gains the hardware allows (default: powers of two up to ``max_gain``).
    ``calibration_inputs``: one batch (a tensor or a tuple of the model's inputs).
    """
    if not isinstance(config, ABFPConfig):
        raise TypeError(f"config must be an ABFPConfig, got {type(config).__name__}")
    if rule == "energy":
        raise ValueError("the energy rule chooses gains for a target metric: use abfp.tune(..., gain_rule='energy')")
    if rule not in ("error", "saturation"):
        raise ValueError(f"gain rule must be 'error' or 'saturation', got {rule!r}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"gain tolerance must be a finite number >= 0, got {tolerance!r}")
    inputs = _as_tuple(calibration_inputs)
    m = convert(model, config if config.seed is not None else config.replace(seed=seed), exclude=exclude)
    m.eval()
    if rule == "saturation":
        if candidates is not None:
            raise ValueError("the saturation rule searches powers of two; give max_gain, not candidates")
        return saturation_gains(m, inputs, config, max_gain=max_gain, threshold=threshold)
    greedy = GreedyGain(candidates if candidates is not None else power_of_two_gains(max_gain), tolerance)
    intercepted_forward(m, inputs, greedy)
    return dict(greedy.chosen)
