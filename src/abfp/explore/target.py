"""The fidelity target a design must meet.

Either relative to float32, ``target = fp32 - drop/100 * |fp32|`` for a metric where higher is
better (``fp32 + drop/100 * |fp32|`` where lower is better): ``drop = 1`` is "within 1 % of
float32", the criterion of the method's authors; or an absolute value of the metric.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Target", "bounded_decision", "decided"]


@dataclass(frozen=True)
class Target:
    """``drop_percent`` (relative to float32) or ``absolute`` (a metric value); exactly one."""

    drop_percent: float | None = 1.0
    absolute: float | None = None

    def __post_init__(self) -> None:
        if (self.drop_percent is None) == (self.absolute is None):
            raise ValueError("give a target drop (percent of float32) or an absolute target, exactly one")
        for name in ("drop_percent", "absolute"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"target {name} must be a finite number, got {v!r}")
        if self.drop_percent is not None and not 0 <= self.drop_percent < 100:
            raise ValueError(f"target drop must be in [0, 100) percent of float32, got {self.drop_percent}")

    def value(self, fp32: float, higher_is_better: bool = True) -> float:
        """The metric value a design must reach (or, lower is better, stay under)."""
        if self.absolute is not None:
            return float(self.absolute)
        if not math.isfinite(fp32):
            raise ValueError(f"the float32 metric is {fp32}; give an absolute target")
        if fp32 == 0 and self.drop_percent:
            raise ValueError("the float32 metric is 0, so a drop relative to it is 0 too; give an absolute target")
        d = float(self.drop_percent) / 100.0 * abs(fp32)
        return fp32 - d if higher_is_better else fp32 + d

    @staticmethod
    def meets(value: float, target: float, higher_is_better: bool = True) -> bool:
        return math.isfinite(value) and (value >= target if higher_is_better else value <= target)

    def describe(self) -> str:
        if self.absolute is not None:
            return f"absolute {self.absolute:g}"
        return f"{self.drop_percent:g}% from float32"


def decided(values: Sequence[float], stderrs: Sequence[float | None], target: float, z: float, *,
            runs: int | None = None, bounds: tuple[float, float] | None = None, higher_is_better: bool = True) -> bool:
    """Whether the runs so far of a noisy design settle its side of the target (early stop).

    First a certain rule: with ``runs`` runs in all and the metric's ``bounds`` known (an
    agreement or accuracy percentage lies in ``[0, 100]``), the design is decided when the mean
    of all ``runs`` runs falls on the same side of the target whether every remaining run scores
    the lowest or the highest value the metric can take (:func:`bounded_decision`); e.g. two runs,
    target 99 %: a first run at 96.9 % fails for certain (the second would need 101.1 %). No
    statistics: the decision is the one all runs would give. Otherwise the statistical rule:

    With ``k`` runs of mean ``m``, spread ``s_run`` (their standard deviation, 0 for one run)
    and mean per-sample standard error ``s_sample`` (the metric's sampling error on the
    evaluated inputs), the mean's standard error is taken as ``max(s_run, s_sample) / sqrt(k)``
    and the design is decided when ``|m - target| >= z`` times it. ``s_sample`` is a
    conservative stand-in for the run-to-run spread (device noise flips at most the samples
    near a decision boundary), so one run can decide a design far from the target. Undecided:
    a zero standard error from a single run, or a run without a per-sample error.
    """
    k = len(values)
    if k and runs is not None and bounds is not None and bounded_decision(values, runs, bounds, target,
                                                                          higher_is_better) is not None:
        return True
    if k == 0 or not math.isfinite(z) or z < 0:
        return False
    known = [e for e in stderrs[:k] if e is not None]
    if len(known) < k and k < 2:
        return False
    s_sample = sum(known) / len(known) if len(known) == k else 0.0
    mean = sum(values) / k
    s_run = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1)) if k > 1 else 0.0
    se = max(s_run, s_sample) / math.sqrt(k)
    if se == 0.0 and k < 2:
        return False
    return abs(mean - target) >= z * se


def bounded_decision(values: Sequence[float], runs: int, bounds: tuple[float, float], target: float,
                     higher_is_better: bool = True) -> bool | None:
    """Whether the mean of ``runs`` runs meets ``target`` when ``values`` (the first runs) are
    known and every remaining run lies in ``bounds`` (the metric's range), or ``None`` when the
    remaining runs could still decide either way. The extreme means are computed as the
    evaluation computes a mean (``statistics.fmean``, correctly rounded, so monotone in each
    value): the answer is the one the full mean gives, whatever the remaining runs score."""
    k = len(values)
    if k == 0 or runs < k:
        return None
    lo, hi = float(bounds[0]), float(bounds[1])
    if not lo <= hi or any(not lo <= v <= hi for v in values):
        return None  # a value outside the stated range: the bounds are wrong, decide nothing
    rest = runs - k
    low = Target.meets(statistics.fmean([*values, *[lo] * rest]), target, higher_is_better)
    high = Target.meets(statistics.fmean([*values, *[hi] * rest]), target, higher_is_better)
    return low if low == high else None
