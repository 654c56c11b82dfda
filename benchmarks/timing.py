"""Timing shared by the benchmarks: interleaved rounds, so machine noise hits every case alike."""

from __future__ import annotations

import time
from typing import Callable


def time_interleaved(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """3 warm-up rounds, then ``repeats`` rounds that each call every function once, in
    order; returns each function's list of seconds."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(3):  # warm-up
        for f in fns:
            f()
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return times


def ratio_row(row: dict, cases: list[str], times: list[list[float]]) -> dict:
    """Add each case's median time (``<case>_ms``) and, for all but the first (the float32
    baseline), the median of its per-round ratios to the first (``<case>_ratio``) to ``row``."""
    import statistics

    for i, (case, t) in enumerate(zip(cases, times)):
        row[f"{case}_ms"] = 1e3 * statistics.median(t)
        if i:
            row[f"{case}_ratio"] = statistics.median(b / a for a, b in zip(times[0], t))
    return row
