"""Gain descent: lower the per-layer gains, most expensive layer first, while the model still
reaches its target.

The error rule (:mod:`.gains`) gives each layer the gain with its least output error; that
minimises every layer's error, not the energy needed to reach a target, and a gain ``G`` costs
``G`` times the analog energy. The descent starts from those gains and visits the modules in
decreasing order of their energy per pass ``c_i`` (:func:`.repeats.noise_profile`); for each it
tries the next lower allowed gain, keeps it when the whole model still reaches the target on
the calibration data (``score``, same noise seed every trial), and tries again lower, else
moves on. The result is locally minimal: lowering any single module's gain once more misses the
target (that module was tried). Cost: about ``modules + lowerings`` calibration forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

__all__ = ["GainDescent", "descend_gains"]


@dataclass
class GainDescent:
    """Gains after the descent, the calibration metric they reach, and every trial
    ``(module, gain tried, metric, kept)``."""

    gains: dict[str, float]
    metric: float
    trials: list[tuple[str, float, float, bool]] = field(default_factory=list)


def descend_gains(gains: Mapping[str, float], candidates: Sequence[float], cost: Mapping[str, float],
                  score: Callable[[dict[str, float]], float], meets: Callable[[float], bool],
                  start_metric: float) -> GainDescent:
    """Lower ``gains`` (module -> gain) through ``candidates`` (the allowed gains) while
    ``meets(score(gains))``; modules in decreasing ``cost`` order. ``start_metric``:
    ``score(gains)``, which must meet the target (else nothing is lowered)."""
    allowed = sorted({float(c) for c in candidates})
    current = dict(gains)
    best = start_metric
    trials: list[tuple[str, float, float, bool]] = []
    if not meets(start_metric):
        return GainDescent(current, best, trials)
    for module in sorted(current, key=lambda m: -cost.get(m, 0.0)):
        while True:
            lower = [c for c in allowed if c < current[module]]
            if not lower:
                break
            trial = {**current, module: lower[-1]}
            v = score(trial)
            ok = meets(v)
            trials.append((module, lower[-1], v, ok))
            if not ok:
                break
            current, best = trial, v
    return GainDescent(current, best, trials)
