"""The noise formulas of SPEC section 5, as plain functions on tensors.

With ``E`` the energy per multiply-accumulate (MAC; photons for an optical device), an output
``i`` of a product with fan-in ``D``, input vector ``x`` and weight row ``w_i``:

* shot noise on the output:     ``sigma_i = ||x|| * ||w_i|| / sqrt(D * E)``
* thermal noise on the output:  ``sigma   = 0.01 * sqrt(D / E) * R_w * R_x``
* weight noise on each weight:  ``sigma   = 0.1 / sqrt(E) * R_w``

``R_w`` and ``R_x`` are the ranges of the weight and input quantisers; here the range of a
tensor is ``max(v) - min(v)`` (the span an 8-bit min/max quantiser covers), see
:func:`tensor_range`. All three standard deviations scale as ``E**-0.5``: repeating an
operation ``k`` times and averaging multiplies ``E`` by ``k`` and divides the noise by
``sqrt(k)``. The noise models (:mod:`abfp.noise.models`) compute them, from the
coefficients here; the standalone ``shot_sigma``, ``thermal_sigma``, ``weight_sigma`` and
``averaged_std``, which nothing used, are deprecated (they warn).

The precision that noise ``sigma`` leaves over a signal range ``R``, as the bits of a uniform
digital quantiser with the same error (``sigma_q = R / (sqrt(12) (2^b - 1))``):
``b_eff = log2(1 + R / (sqrt(12) * sigma))`` (:func:`effective_bits`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = [
    "SHOT_COEFFICIENT",
    "THERMAL_COEFFICIENT",
    "WEIGHT_COEFFICIENT",
    "averaged_std",
    "effective_bits",
    "shot_sigma",
    "tensor_range",
    "thermal_sigma",
    "weight_sigma",
]

#: ``sigma_i = c * ||x|| ||w_i|| / sqrt(D E)`` with c = 1.
SHOT_COEFFICIENT = 1.0
#: ``sigma = c * sqrt(D / E) * R_w * R_x`` with c = 0.01.
THERMAL_COEFFICIENT = 0.01
#: ``sigma = c / sqrt(E) * R_w`` with c = 0.1.
WEIGHT_COEFFICIENT = 0.1

Number = float | Tensor


def _deprecated(name: str) -> None:
    warnings.warn(f"abfp.noise.{name} is deprecated and will be removed: nothing in abfp uses it; the noise "
                  f"models (ShotNoise, ThermalNoise, WeightNoise) compute their own standard deviations",
                  DeprecationWarning, stacklevel=3)


def shot_sigma(x_norm: Number, w_norm: Number, fan_in: Number, energy: Number,
               coefficient: float = SHOT_COEFFICIENT) -> Number:
    """Deprecated. ``sigma_i = c * ||x|| * ||w_i|| / sqrt(D * E)`` (broadcasting)."""
    _deprecated("shot_sigma")
    return coefficient * x_norm * w_norm / _sqrt(fan_in * energy)


def thermal_sigma(fan_in: Number, energy: Number, weight_range: Number, input_range: Number,
                  coefficient: float = THERMAL_COEFFICIENT) -> Number:
    """Deprecated. ``sigma = c * sqrt(D / E) * R_w * R_x`` (c = 0.01)."""
    _deprecated("thermal_sigma")
    return coefficient * _sqrt(fan_in / energy) * weight_range * input_range


def weight_sigma(energy: Number, weight_range: Number, coefficient: float = WEIGHT_COEFFICIENT) -> Number:
    """Deprecated. ``sigma = c / sqrt(E) * R_w`` (c = 0.1), on every weight."""
    _deprecated("weight_sigma")
    return coefficient * weight_range / _sqrt(energy)


def averaged_std(std: Number, repeats: Number) -> Number:
    """Deprecated. Standard deviation of the mean of ``k`` independent repeats: ``std / sqrt(k)``."""
    _deprecated("averaged_std")
    return std / _sqrt(repeats)


def effective_bits(signal_range: Number, sigma: Number) -> Number:
    """``b_eff = log2(1 + R / (sqrt(12) * sigma))``; ``inf`` where ``sigma`` is 0."""
    if isinstance(signal_range, Tensor) or isinstance(sigma, Tensor):
        r = torch.as_tensor(signal_range, dtype=torch.float64)
        s = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.log2(1.0 + r / (math.sqrt(12.0) * s))
    if sigma == 0:
        return math.inf
    return math.log2(1.0 + signal_range / (math.sqrt(12.0) * sigma))


def tensor_range(t: Tensor) -> float:
    """Range of a min/max quantiser of ``t``: ``max(t) - min(t)`` (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0.0
    t = t.detach()
    return float(t.max() - t.min())


def _sqrt(v: Number) -> Number:
    return torch.sqrt(v) if isinstance(v, Tensor) else math.sqrt(v)
