"""Repeats per layer: the least energy that reaches a fidelity target (SPEC section 5).

Repeating a layer's analog products ``k`` times and averaging divides its device noise's
standard deviation by ``sqrt(k)`` and multiplies its analog, input-DAC and ADC energy by ``k``.

1. One pass on the calibration batch measures each module's noise error ``r_i`` (the relative
   difference between its product with and without the device noise, on the same inputs,
   upstream layers on the device) and the energy ``c_i`` one more repeat of it costs
   (:func:`abfp.energy.row_cost`).
2. Minimising the summed noise variance ``sum_i r_i**2 / k_i`` at a fixed energy
   ``sum_i c_i k_i`` gives ``k_i`` proportional to ``r_i / sqrt(c_i)`` (Lagrange):
   ``k_i(lam) = clamp(round(lam * r_i / sqrt(c_i)), 1, max_repeats)``.
3. A bisection on ``log lam`` finds the least ``lam`` whose plan reaches the target metric on
   the calibration data (each trial with the same noise seed: common random numbers). When
   even ``max_repeats`` everywhere misses the target, the noise is not what limits the model:
   no module is repeated (the trials record what it would have given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..config import ABFPConfig
from ..energy import EnergyParams, row_cost
from ..nn import summary
from .gains import intercepted_forward

__all__ = ["NoiseProfile", "noise_profile", "allocate", "search_repeats", "RepeatSearch"]


@dataclass
class NoiseProfile:
    """Per module: noise error ``r`` (relative) and energy per extra repeat ``c`` (pJ per batch)."""

    noise_error: dict[str, float]
    repeat_energy: dict[str, float]


class _NoiseMeter:
    """Interceptor: per module, ``||Y_noisy - Y_clean||**2`` and ``||Y_fp32||**2``; the model
    continues with the noisy product."""

    def __init__(self) -> None:
        self.err: dict[str, float] = {}
        self.ref: dict[str, float] = {}

    def __call__(self, call: Any) -> torch.Tensor:
        module = call.site.rsplit(":", 1)[0]
        y = call.analog(call.config)
        clean = call.analog(call.config.replace(noise_std=0.0))
        ref = call.digital().detach().double()
        self.err[module] = self.err.get(module, 0.0) + float(((y.detach().double() - clean.double()) ** 2).sum())
        self.ref[module] = self.ref.get(module, 0.0) + float((ref * ref).sum())
        return y


@torch.no_grad()
def noise_profile(converted: nn.Module, inputs: tuple[torch.Tensor, ...],
                  params: EnergyParams | None = None) -> NoiseProfile:
    """:class:`NoiseProfile` of a converted model (its configs as they are) on one batch."""
    meter = _NoiseMeter()
    intercepted_forward(converted, inputs, meter)
    r = {m: math.sqrt(meter.err[m] / meter.ref[m]) if meter.ref[m] > 0 else 0.0 for m in meter.err}
    params = params or EnergyParams()
    c: dict[str, float] = {}
    for row in summary(converted, inputs, errors=False).rows:
        if row.kind == "digital" or row.config is None:
            continue
        module = row.site.rsplit(":", 1)[0]
        cfg1 = row.config.replace(repeats=1)
        e1 = row_cost(row, cfg1, params)
        e2 = row_cost(row, cfg1.replace(repeats=2), params)
        c[module] = c.get(module, 0.0) + e2.total_energy - e1.total_energy
    return NoiseProfile(r, c)


def allocate(profile: NoiseProfile, lam: float, max_repeats: int) -> dict[str, int]:
    """``k_i = clamp(round(lam * r_i / sqrt(c_i)), 1, max_repeats)`` for every module with noise."""
    out = {}
    for m, r in profile.noise_error.items():
        c = profile.repeat_energy.get(m, 0.0)
        if r <= 0:
            k = 1
        elif c <= 0:
            k = max_repeats
        else:
            k = int(round(lam * r / math.sqrt(c)))
        out[m] = max(1, min(max_repeats, k))
    return out


@dataclass
class RepeatSearch:
    """Result of :func:`search_repeats`: the repeats per module, the metric they reached on the
    calibration data, whether that meets the target, and every trial ``(lam, metric)``."""

    repeats: dict[str, int]
    metric: float
    reached: bool
    trials: list[tuple[float, float]] = field(default_factory=list)


def search_repeats(
    profile: NoiseProfile,
    score: Callable[[dict[str, int]], float],
    meets: Callable[[float], bool],
    *,
    max_repeats: int = 16,
    steps: int = 8,
) -> RepeatSearch:
    """The least ``lam`` (bisection in ``log lam``, ``steps`` trials) whose repeats meet the target.

    ``score(repeats)`` evaluates the plan with those repeats; ``meets(value)`` tells whether it
    reaches the target. Without noise (all ``r_i = 0``) nothing is repeated.
    """
    if isinstance(max_repeats, bool) or not isinstance(max_repeats, int) or max_repeats < 1:
        raise ValueError(f"max_repeats must be an integer >= 1, got {max_repeats!r}")
    ratios = [r / math.sqrt(profile.repeat_energy[m]) for m, r in profile.noise_error.items()
              if r > 0 and profile.repeat_energy.get(m, 0.0) > 0]
    trials: list[tuple[float, float]] = []
    ones = {m: 1 for m in profile.noise_error}
    base = score(ones)
    trials.append((0.0, base))
    if meets(base) or not ratios or max_repeats == 1:
        return RepeatSearch(ones, base, meets(base), trials)
    hi = max_repeats / min(ratios)  # every module at max_repeats
    lo = 0.5 / max(ratios)  # every module at 1
    top = allocate(profile, hi, max_repeats)
    v_hi = score(top)
    trials.append((hi, v_hi))
    if not meets(v_hi):  # noise is not what limits: repeats would cost energy for nothing
        return RepeatSearch(ones, base, False, trials)
    best, best_v = top, v_hi
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        reps = allocate(profile, mid, max_repeats)
        v = score(reps)
        trials.append((mid, v))
        if meets(v):
            hi, best, best_v = mid, reps, v
        else:
            lo = mid
    return RepeatSearch(best, best_v, True, trials)
