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

``passes``: the modules are gone through again, up to that many times in all (``None``: until a
whole pass moves nothing), as long as the previous pass moved a module: a move frees or takes
energy and changes what the other modules see, so a module refined early may have a better
neighbour afterwards (EfficientNet-Lite0: the stem's 22.6 x 4 fits the budget only once block 0's
depthwise convolution has given up two repeats, later in the same pass). A plan already scored is
not scored again (the scores are paired, so the same plan has the same score). Run until nothing
moves, the result is a local optimum: no single move of one of ``modules`` within its
neighbourhood and ``limit`` scores better. It always ends: every move strictly improves the metric
of a plan from a finite set.

``margin``: a module moves only when its best neighbour beats the current plan by more than that
fraction of the current metric (default 0: any improvement). The calibration inputs are few (64
crops on EfficientNet-Lite0), and a move that wins on them by a hair can lose held out (session
14: block 0's depthwise convolution gave up two repeats on a tie, 0.05020 against 0.05022, and the
held-out KL rose); a margin keeps such a module where the energy rule put it.
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
    passes: int = 1  #: passes gone through (the last one moved nothing, unless the limit on passes stopped it)

    def moved(self, before: Mapping[str, Setting]) -> dict[str, tuple[Setting, Setting]]:
        """``{module: (setting before, setting after)}`` for the modules the refinement moved."""
        return {m: (before[m], s) for m, s in self.settings.items() if before.get(m) != s}


def check_refine_options(passes: int | None, margin: float, prefix: str = "") -> None:
    """ValueError unless ``passes`` is an integer >= 1 or ``None`` and ``margin`` a number in
    ``[0, 1)`` (``prefix``: how the caller names them, e.g. ``"refine_"``)."""
    if passes is not None and (isinstance(passes, bool) or not isinstance(passes, int) or passes < 1):
        raise ValueError(f"{prefix}passes must be an integer >= 1 or None (until nothing moves), got {passes!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ValueError(f"{prefix}margin must be a number in [0, 1) (a fraction of the metric), got {margin!r}")


def refine_settings(settings: Mapping[str, Setting], modules: Sequence[str], gains: Sequence[float],
                    repeats: Sequence[int], energy: Callable[[Mapping[str, Setting]], float], limit: float,
                    score: Callable[[dict[str, Setting]], float], start_metric: float, higher_is_better: bool,
                    width: int = 1, passes: int | None = 1, margin: float = 0.0) -> Refinement:
    """Refine ``settings`` (module -> ``(gain, repeats)``, scoring ``start_metric``) module by
    module, for up to ``passes`` passes (``None``: until one moves nothing; see the module
    docstring). ``energy(settings)``: the plan's energy, in the units of ``limit``."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    check_refine_options(passes, margin)
    missing = [m for m in modules if m not in settings]
    if missing:
        raise KeyError(f"refine_settings: {missing[0]!r} has no setting to refine")
    allowed = sorted({float(g) for g in gains})
    reps = sorted({int(k) for k in repeats})
    current, best = dict(settings), start_metric
    trials: list[tuple[str, float, int, float]] = []
    scored: dict[frozenset[tuple[str, Setting]], float] = {frozenset(current.items()): start_metric}

    def better(v: float, than: float) -> bool:
        return v > than if higher_is_better else v < than

    def clears(v: float, than: float) -> bool:  # better by more than the margin
        return better(v, than + (margin * abs(than) if higher_is_better else -margin * abs(than)))

    done = 0
    while passes is None or done < passes:
        done += 1
        moved = False
        for module in modules:
            gain, _ = current[module]
            at = min(range(len(allowed)), key=lambda j: abs(allowed[j] - gain))
            choice, cand = None, best
            for g in allowed[max(0, at - width): at + width + 1]:
                for k in reps:
                    trial = {**current, module: (g, k)}
                    if (g, k) == current[module] or energy(trial) > limit:
                        continue
                    key = frozenset(trial.items())
                    if key not in scored:
                        scored[key] = score(trial)
                        trials.append((module, g, k, scored[key]))
                    if better(scored[key], cand):
                        choice, cand = (g, k), scored[key]
            if choice is not None and clears(cand, best):
                current[module], best, moved = choice, cand, True
        if not moved:
            break
    return Refinement(current, best, trials, done)
