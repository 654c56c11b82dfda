"""Speed of a converted nn.LSTM against float32 nn.LSTM (inference).

The issue's setting: 2 layers, hidden 256, input 256, sequence 100, batch 64. Every case is
timed interleaved with float32 ``nn.LSTM`` in the same loop (A, B, C, ...) so that machine
noise hits all alike; the figure that matters is the median ratio to float32. A third
column times the same recurrence written step by step in float32 torch (one ``F.linear``
for the inputs of all steps, one per step for ``h W_hh^T``, the gates as torch ops): what a
Python-level recurrence costs before any device simulation, i.e. the floor of this design.
Usage:

    python benchmarks/bench_lstm.py [--repeats 10] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import abfp
from timing import time_interleaved  # benchmarks/timing.py

CASES = {
    "n128 G8 noise off": abfp.ABFPConfig(noise_std=0.0),
    "n128 G8 noise 1 LSB": abfp.ABFPConfig(noise_std=1.0),
    "n128 G8 concat": abfp.ABFPConfig(noise_std=0.0, recurrent_concat=True),
    "n8 G1 noise off": abfp.ABFPConfig(tile_width=8, gain=1.0, noise_std=0.0),
}


def stepwise_fp32(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """The LSTM as a Python loop of float32 torch ops (the structure abfp simulates)."""
    T, B, _ = x.shape
    H = lstm.hidden_size
    for layer in range(lstm.num_layers):
        w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
        b = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        gi = F.linear(x.reshape(T * B, -1), w_ih, b).reshape(T, B, -1)
        h = c = x.new_zeros(B, H)
        outs = []
        for t in range(T):
            i, f, g, o = (gi[t] + F.linear(h, w_hh)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        x = torch.stack(outs)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cases", default=None, help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = CASES if not args.cases else {k: CASES[k] for k in args.cases.split(",")}
    torch.manual_seed(0)
    lstm = nn.LSTM(args.hidden, args.hidden, num_layers=args.layers).eval()
    x = torch.randn(args.seq, args.batch, args.hidden)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}; "
          f"LSTM {args.layers} layers, hidden {args.hidden}, sequence {args.seq}, batch {args.batch}")
    print(f"{'case':<22} {'fp32 ms':>9} {'stepwise fp32':>14} {'abfp ms':>9} {'ratio':>7} {'floor ratio':>12}")
    rows = []
    for name, cfg in cases.items():
        conv = abfp.convert(lstm, cfg)
        with torch.no_grad():
            t_fp, t_step, t_ab = time_interleaved([lambda: lstm(x), lambda: stepwise_fp32(lstm, x), lambda: conv(x)],
                                                  args.repeats)
        row = dict(case=name, fp32_ms=1e3 * statistics.median(t_fp), stepwise_ms=1e3 * statistics.median(t_step),
                   abfp_ms=1e3 * statistics.median(t_ab), ratio=statistics.median([b / a for a, b in zip(t_fp, t_ab)]),
                   floor_ratio=statistics.median([b / a for a, b in zip(t_fp, t_step)]))
        rows.append(row)
        print(f"{name:<22} {row['fp32_ms']:>9.1f} {row['stepwise_ms']:>14.1f} {row['abfp_ms']:>9.1f} "
              f"{row['ratio']:>7.2f} {row['floor_ratio']:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
