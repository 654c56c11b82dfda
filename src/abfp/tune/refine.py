"""Refinement on the real metric: the energy rule's choice for its riskiest modules, checked on
the model and moved to a neighbouring setting where the model scores better.

The energy rule (:mod:`.allocate`) orders its moves by a predicted loss ``s_i e_i**2``: a
module's relative output error times the metric's sensitivity to it. That proxy can misjudge a
module. On EfficientNet-Lite0 the stem convolution's output error is least at G = 16 (at
G = 22.6 a few large outputs clip, and the squared error counts them in full), while the model's
KL to float32 is lower at G = 22.6, where the small outputs get finer ADC codes (the clipped
ones are clipped again by the ReLU6 after the stem's batch norm: docs/tune.md, session 14).

The refinement: for each of the modules in ``modules`` (the caller passes those with the largest
predicted loss at the chosen settings, largest first), every setting ``(G, k)`` whose gain lies
within ``width`` places of the module's gain in the sorted candidate ``gains`` (any of the
``repeats``) and whose plan stays within the energy ``limit`` is scored on the calibration
inputs (``score``: the same noise seed at every trial, so the comparisons are paired); the
module moves to the best of them when that beats the current plan, and the next module is
refined with it in place. The result is never worse on the calibration inputs than the plan it
starts from and never costs more than ``limit``. Cost: at most
``len(modules) * (2 width + 1) * len(repeats) - 1`` calibration forwards per module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

__all__ = ["Refinement", "refine_settings"]

Setting = tuple[float, int]


@dataclass
class Refinement:
    """The settings after the refinement, their calibration metric, and every trial
    ``(module, gain, repeats, metric)`` in the order run."""

    settings: dict[str, Setting]
    metric: float
    trials: list[tuple[str, float, int, float]] = field(default_factory=list)

    def moved(self, before: Mapping[str, Setting]) -> dict[str, tuple[Setting, Setting]]:
        """``{module: (setting before, setting after)}`` for the modules the refinement moved."""
        return {m: (before[m], s) for m, s in self.settings.items() if before.get(m) != s}


def refine_settings(settings: Mapping[str, Setting], modules: Sequence[str], gains: Sequence[float],
                    repeats: Sequence[int], energy: Callable[[Mapping[str, Setting]], float], limit: float,
                    score: Callable[[dict[str, Setting]], float], start_metric: float, higher_is_better: bool,
                    width: int = 1) -> Refinement:
    """Refine ``settings`` (module -> ``(gain, repeats)``, scoring ``start_metric``) module by
    module (see the module docstring). ``energy(settings)``: the plan's energy, in the units of
    ``limit``."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    missing = [m for m in modules if m not in settings]
    if missing:
        raise KeyError(f"refine_settings: {missing[0]!r} has no setting to refine")
    allowed = sorted({float(g) for g in gains})
    reps = sorted({int(k) for k in repeats})
    current, best = dict(settings), start_metric
    trials: list[tuple[str, float, int, float]] = []

    def better(v: float, than: float) -> bool:
        return v > than if higher_is_better else v < than

    for module in modules:
        gain, _ = current[module]
        at = min(range(len(allowed)), key=lambda j: abs(allowed[j] - gain))
        choice = None
        for g in allowed[max(0, at - width): at + width + 1]:
            for k in reps:
                trial = {**current, module: (g, k)}
                if (g, k) == current[module] or energy(trial) > limit:
                    continue
                v = score(trial)
                trials.append((module, g, k, v))
                if better(v, best):
                    choice, best = (g, k), v
        if choice is not None:
            current[module] = choice
    return Refinement(current, best, trials)
