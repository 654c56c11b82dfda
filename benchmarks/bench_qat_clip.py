"""A QAT forward + backward where ADC samples clip (high gains), in process CPU time.

Where a sample of a convolution clips, its straight-through backward needs the ADC clamp mask.
This times one forward + backward (a sum of logsumexp of the logits, so no labels are needed;
batch norm in eval mode, as ``abfp.finetune`` finetunes EfficientNet-Lite0) of a converted
model on ``--batch`` inputs at each ``--gains`` (one gain everywhere), interleaved with the
float32 model's, and counts the clipped convolutions per step. Run it once with the code
before a change and once after (``PYTHONPATH``) to compare.

    python3 benchmarks/bench_qat_clip.py --models efficientnet-lite0,fashion-cnn --gains 8,64 --batch 8 --repeats 3
"""

from __future__ import annotations

import json
import statistics
import time

import torch

import abfp.ops.conv as conv_family
from abfp import ABFPConfig, zoo
from abfp.nn import convert
from abfp.numerics import ProductStats
from timing import bench_args, time_interleaved, write_rows  # benchmarks/timing.py


def inputs(name: str, batch: int) -> torch.Tensor:
    task = zoo.get(name)
    data = task.load_calibration() if task.load_calibration is not None else task.load_data()
    return data.inputs[0][:batch]


def step_of(model: torch.nn.Module, x: torch.Tensor):
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).float().logsumexp(-1).sum().backward()

    return step


def clipped_convolutions(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Convolutions of one forward in which an ADC sample clipped."""
    real = conv_family._conv2d_train
    hits = []

    def counting(*a, **k):
        stats = a[8] if len(a) > 8 else k.get("stats")
        mine = ProductStats()
        out = real(*a[:8], mine, *a[9:], **{kk: v for kk, v in k.items() if kk != "stats"})
        hits.append(mine.saturated > 0)
        if stats is not None:
            stats.saturated += mine.saturated
            stats.conversions += mine.conversions
        return out

    conv_family._conv2d_train = counting
    try:
        with torch.enable_grad():
            model(x)
    finally:
        conv_family._conv2d_train = real
    return sum(hits)


def main() -> None:
    def extra(ap):
        ap.add_argument("--models", default="efficientnet-lite0,fashion-cnn")
        ap.add_argument("--gains", default="8,64")
        ap.add_argument("--batch", type=int, default=8)

    args = bench_args(__doc__, repeats=3, threads=1, extra=extra)
    rows = []
    for name in args.models.split(","):
        x = inputs(name, args.batch)
        base = zoo.get(name).build_model().float()
        gains = [float(g) for g in args.gains.split(",")]
        models = [base] + [convert(base, ABFPConfig(gain=g, noise_std=0.2887), inplace=False).float() for g in gains]
        times = time_interleaved([step_of(m, x) for m in models], args.repeats, clock=time.process_time)
        for g, m, t in zip(gains, models[1:], times[1:]):
            row = {"model": name, "batch": args.batch, "gain": g, "threads": args.threads, "repeats": args.repeats,
                   "float32_cpu_s": statistics.median(times[0]), "qat_cpu_s": statistics.median(t),
                   "ratio": statistics.median(b / a for a, b in zip(times[0], t)),
                   "clipped_convolutions": clipped_convolutions(m, x)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
