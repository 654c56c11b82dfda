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
