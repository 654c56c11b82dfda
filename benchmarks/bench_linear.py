"""Speed of a converted nn.Linear against a float32 nn.Linear of the same shape.

Both are timed interleaved in the same run (A, B, A, B, ...) so that machine noise hits
both alike; the figure that matters is the median ratio. Usage:

    python benchmarks/bench_linear.py [--repeats 30] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

import abfp
from timing import time_interleaved  # benchmarks/timing.py

SHAPES = [(256, 512, 512), (512, 1024, 1024), (2048, 1024, 1024)]
CASES = {
    "n128 G8 noise off": abfp.ABFPConfig(noise_std=0.0),
    "n128 G8 noise 1 LSB": abfp.ABFPConfig(noise_std=1.0),
    "n8 G1 noise off": abfp.ABFPConfig(tile_width=8, gain=1.0, noise_std=0.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default=None, help="e.g. 256x512x512,512x1024x1024 (M x K x N)")
    ap.add_argument("--cases", default=None, help="only the cases whose name contains this (e.g. n8)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by process CPU time instead of wall clock (steadier on a machine shared with other jobs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'case':<22} {'M x K x N':<18} {'fp32 ms':>9} {'abfp ms':>9} {'ratio':>7}")
    rows = []
    for (m, k, n) in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(k, n).eval()
        x = torch.randn(m, k)
        for name, cfg in CASES.items():
            if args.cases and args.cases not in name:
                continue
            conv = abfp.convert(lin, cfg)
            with torch.no_grad():
                t_fp, t_ab = time_interleaved([lambda: lin(x), lambda: conv(x)], args.repeats,
                                                time.process_time if args.cpu_time else time.perf_counter)
            ratios = [b / a for a, b in zip(t_fp, t_ab)]
            row = dict(case=name, m=m, k=k, n=n, fp32_ms=1e3 * statistics.median(t_fp),
                       abfp_ms=1e3 * statistics.median(t_ab), ratio=statistics.median(ratios))
            rows.append(row)
            print(f"{name:<22} {f'{m}x{k}x{n}':<18} {row['fp32_ms']:>9.2f} {row['abfp_ms']:>9.2f} {row['ratio']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
