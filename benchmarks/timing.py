"""Timing shared by the benchmarks: interleaved rounds, so machine noise hits every case alike."""

from __future__ import annotations

import argparse
import time
from typing import Callable


def time_interleaved(fns: list[Callable[[], object]], repeats: int,
                     clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """3 warm-up rounds, then ``repeats`` rounds that each call every function once, in
    order; returns each function's list of seconds (by ``clock``: wall clock, or
    ``time.process_time`` for CPU time)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(3):  # warm-up
        for f in fns:
            f()
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = clock()
            f()
            times[i].append(clock() - t0)
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


def bench_args(doc: str | None, repeats: int, threads: int,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options every benchmark takes (``--repeats``, ``--threads``, ``--json``), plus
    ``extra``'s; sets torch's thread count and prints the torch version, threads and processor."""
    import platform

    import torch

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--json", default=None)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    return args


def model_bench_args(doc: str | None, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """:func:`bench_args` of a per-model step benchmark: also ``--models`` and ``--batch-size``."""

    def options(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--models", default="fashion-cnn,fashion-vit")
        ap.add_argument("--batch-size", type=int, default=64)
        if extra is not None:
            extra(ap)

    return bench_args(doc, repeats=20, threads=1, extra=options)


def training_batch(name: str, batch_size: int, pool: int = 512):
    """``(x, y, pool_inputs)``: a fixed random batch (seed 0) of ``name``'s training data, and
    the shuffled first ``pool`` inputs it was drawn from."""
    import torch

    from abfp.finetune.data import training_data

    data = training_data(name, pool)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return data.inputs[0][idx[:batch_size]], data.targets[idx[:batch_size]], data.inputs[0][idx]


def training_step(model, x, y) -> Callable[[], None]:
    """One training step of ``model`` on ``(x, y)``: forward, cross-entropy, backward, AdamW (lr 1e-4)."""
    import torch
    import torch.nn.functional as F

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def write_rows(path: str | None, rows: list[dict]) -> None:
    """Write ``rows`` as a JSON list to ``path`` (nothing when ``path`` is None)."""
    import json

    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
