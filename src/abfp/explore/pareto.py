"""The Pareto frontier of designs: metric against energy per inference.

A design is on the frontier when no other design is at least as good on both axes (energy no
higher, metric no worse) and strictly better on one. Designs with the same energy and the
same metric are all on it (none dominates the other).
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["pareto_front", "dominates"]


def dominates(a: tuple[float, float], b: tuple[float, float], higher_is_better: bool = True) -> bool:
    """Whether ``a = (energy, metric)`` dominates ``b``: cheaper or equal, and better or equal, one strictly."""
    ea, va = a
    eb, vb = b
    if not higher_is_better:
        va, vb = -va, -vb
    return ea <= eb and va >= vb and (ea < eb or va > vb)


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the non-dominated ``(energy, metric)`` points, by increasing energy.

    ``O(m log m)``: sorted by energy (then best metric first), a point is on the frontier when
    its metric beats every cheaper point's. Points with a non-finite coordinate are never on it.
    """
    sign = 1.0 if higher_is_better else -1.0
    idx = [i for i, (e, v) in enumerate(points) if math.isfinite(e) and math.isfinite(v)]
    idx.sort(key=lambda i: (points[i][0], -sign * points[i][1]))
    front: list[int] = []
    best = -math.inf  # best signed metric among strictly cheaper points
    group_best = -math.inf  # best signed metric at the current energy
    current_e = None
    for i in idx:
        e, v = points[i][0], sign * points[i][1]
        if e != current_e:
            best = max(best, group_best)
            current_e, group_best = e, v  # the first of a group has the group's best metric
        if v > best and v == group_best:
            front.append(i)
    return front
