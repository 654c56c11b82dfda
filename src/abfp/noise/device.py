"""The ABFP device's own output noise, driven by repeats (or energy) like the other noises.

Averaging ``k`` repeats of a product divides the device noise's standard deviation by
``sqrt(k)`` at ``k`` times the energy. :func:`device_config` maps a base config (or a base
``noise_std``) and ``k`` to the :class:`~abfp.ABFPConfig` with ``noise_std / sqrt(k)``;
:func:`device_config_for_energy` does the same for a continuous energy ratio
``k = E / E_base``; :func:`repeat_overrides` builds per-module overrides for
:func:`abfp.convert`. This is exact for the noise before the ADC only in its standard
deviation (uniform noise averaged over k draws is no longer uniform); :class:`RepeatAverage`
simulates the repeats literally instead (k device calls, outputs averaged after the ADC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from ..config import ABFPConfig

__all__ = ["RepeatAverage", "device_config", "device_config_for_energy", "repeat_overrides"]


def device_config(base: ABFPConfig | float, repeats: int = 1) -> ABFPConfig:
    """The device after averaging ``repeats`` runs: ``noise_std -> noise_std / sqrt(k)``.

    ``base``: a config, or a base ``noise_std`` (in ADC LSBs) on the default config.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    return device_config_for_energy(base, float(repeats))


def device_config_for_energy(base: ABFPConfig | float, energy_ratio: float) -> ABFPConfig:
    """``noise_std / sqrt(E / E_base)`` for a continuous energy ratio ``E / E_base > 0``."""
    if not energy_ratio > 0 or not math.isfinite(energy_ratio):
        raise ValueError(f"energy ratio must be a finite number > 0, got {energy_ratio!r}")
    cfg = base if isinstance(base, ABFPConfig) else ABFPConfig(noise_std=float(base))
    return cfg.replace(noise_std=cfg.noise_std / math.sqrt(energy_ratio))


def repeat_overrides(base: ABFPConfig, repeats: Mapping[str, int]) -> dict[str, ABFPConfig]:
    """``{module name: config}`` for :func:`abfp.convert`'s ``overrides``: each listed module
    (and what it contains) averages its own number of repeats."""
    return {name: device_config(base, k) for name, k in repeats.items()}


@dataclass
class RepeatAverage:
    """An interceptor that runs a product ``k`` times on the device and averages the outputs.

    Install with ``abfp.analog_state(model).interceptors[site or "*"] = RepeatAverage(k)``;
    ``per_site`` overrides ``k`` for listed sites, which must be product sites of the model (checked by
    :meth:`abfp.nn.state.AnalogState.check_interceptor_site`). Each run draws its own device noise.
    """

    repeats: int = 1
    per_site: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        for k in [self.repeats, *(self.per_site or {}).values()]:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"repeats must be integers >= 1, got {k!r}")

    def __call__(self, call: Any) -> Tensor:
        k = (self.per_site or {}).get(call.site, self.repeats)
        y = call.analog()
        if k == 1:
            return y
        acc = y.to(torch.float32)
        for _ in range(k - 1):
            acc = acc + call.analog().to(torch.float32)
        return (acc / k).to(y.dtype)
