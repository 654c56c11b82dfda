"""The smallest energy that reaches a target: a geometric bracket, then bisection in log E.

``fn(E)`` is assumed non-decreasing in ``E`` (more energy, less noise, a better metric). With
noise the measured metric is only nearly monotone; evaluate it with a fixed seed (common
random numbers) so that neighbouring energies see the same draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["SearchResult", "TargetNotReached", "search_min_energy"]


class TargetNotReached(ValueError):
    """Even the largest energy allowed does not reach the target."""


@dataclass
class SearchResult:
    """``energy``: the smallest energy found whose metric reaches the target (within
    ``rel_tol``); ``metric``: its metric; ``evaluations``: every ``(E, metric)`` tried, in order."""

    energy: float
    metric: float
    evaluations: list[tuple[float, float]] = field(default_factory=list)


def search_min_energy(fn: Callable[[float], float], target: float, *, start: float = 1.0, factor: float = 4.0,
                      rel_tol: float = 0.02, lowest: float = 1e-9, highest: float = 1e15,
                      max_evals: int = 60) -> SearchResult:
    """Smallest ``E`` in ``[lowest, highest]`` with ``fn(E) >= target``, to a relative
    tolerance ``rel_tol`` (the answer ``E_hi`` has ``fn(E_hi) >= target`` and an energy
    ``E_hi / (1 + rel_tol)`` or more below it failed, unless ``E_hi == lowest``).

    1. Bracket: from ``start`` step by ``factor`` (down while the target is met, up while not).
    2. Bisect: ``E_mid = sqrt(E_lo E_hi)`` until ``E_hi / E_lo <= 1 + rel_tol``.
    """
    if not (start > 0 and factor > 1 and rel_tol > 0 and 0 < lowest <= highest):
        raise ValueError("need start > 0, factor > 1, rel_tol > 0 and 0 < lowest <= highest")
    evals: list[tuple[float, float]] = []
    cache: dict[float, float] = {}

    def f(e: float) -> float:
        if e not in cache:
            if len(evals) >= max_evals:
                raise RuntimeError(f"search_min_energy: more than {max_evals} evaluations")
            v = float(fn(e))
            cache[e] = v
            evals.append((e, v))
        return cache[e]

    e = min(max(start, lowest), highest)
    if f(e) >= target:
        hi = e
        while True:
            lo = max(hi / factor, lowest)
            if lo == hi:  # the lowest energy allowed still reaches the target
                return SearchResult(hi, f(hi), evals)
            if f(lo) < target:
                break
            hi = lo
    else:
        lo = e
        while True:
            hi = min(lo * factor, highest)
            if hi == lo:
                best = max(evals, key=lambda t: t[1])
                raise TargetNotReached(f"target {target:.4g} not reached up to E = {highest:g} "
                                       f"(best {best[1]:.4g} at E = {best[0]:.4g})")
            if f(hi) >= target:
                break
            lo = hi
    while hi / lo > 1.0 + rel_tol:
        mid = math.sqrt(lo * hi)
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid
    return SearchResult(hi, f(hi), evals)
