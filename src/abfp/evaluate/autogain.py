"""Auto gain: one gain per layer, chosen from calibration data (beyond the paper).

For each power of two ``G`` from 1 to ``max_gain`` the calibration batch runs noise-free
at that gain everywhere, and every analog product records its saturated fraction (the
share of ADC samples with ``|G u / n| > 1``). Each module then gets the largest ``G`` whose
saturated fraction stays at or under ``threshold`` for all its products (default 1e-4:
the 99.99th percentile of ``|G u / n|`` stays at most 1). Layers with short reductions
(depthwise convolutions, K = 9) get large gains, dense layers small ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ABFPConfig
from ..nn import analog_state, convert, is_converted, set_config, summary


@torch.no_grad()
def choose_gains(
    model: nn.Module,
    example_input: Any,
    config: ABFPConfig,
    *,
    max_gain: float = 256.0,
    threshold: float = 1e-4,
) -> dict[str, float]:
    """Module name -> gain. ``model`` may be converted already (its config is restored after)."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    m = model if is_converted(model) else convert(model, config)
    state = analog_state(m)
    saved = (state.config, dict(state.overrides))
    worst: dict[str, dict[float, float]] = {}  # module -> gain -> worst saturated fraction
    try:
        g = 1.0
        while g <= max_gain:
            set_config(m, config.replace(gain=g, noise_std=0.0))
            for row in summary(m, example_input, errors=False).rows:
                module = row.site.rsplit(":", 1)[0]
                per_gain = worst.setdefault(module, {})
                per_gain[g] = max(per_gain.get(g, 0.0), row.saturated_fraction)
            g *= 2
    finally:
        set_config(m, saved[0], overrides=saved[1])
    return {module: max([g for g, f in per_gain.items() if f <= threshold], default=1.0)
            for module, per_gain in worst.items()}


def gain_overrides(gains: dict[str, float], config: ABFPConfig) -> dict[str, ABFPConfig]:
    """Per-module configs (exact module names) for :func:`abfp.convert`'s ``overrides``."""
    import re

    return {re.escape(name): config.replace(gain=g) for name, g in gains.items()}
