"""Speed of a converted nn.Conv3d and nn.ConvTranspose2d against the float32 layers.

Both are timed interleaved in the same run (A, B, A, B, ...) so that machine noise hits
both alike; the figure that matters is the median ratio. Layers (issue #12 item 6):
Conv3d 32->32, 3x3x3, padding 1, on a 32^3 volume, batch 2; ConvTranspose2d 64->32, 4x4,
stride 2, padding 1, on 32x32, batch 32. Device: 8/8/8 bits, n = 128, G = 8. Usage:

    python benchmarks/bench_conv_nd.py [--repeats 10] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import json
import statistics

import torch
from torch import nn

import abfp
from timing import bench_args, time_interleaved  # benchmarks/timing.py

BASE = abfp.ABFPConfig(tile_width=128, gain=8.0, input_bits=8, weight_bits=8, output_bits=8)
CASES = {
    "noise off": BASE.replace(noise_std=0.0),
    "noise 1 LSB": BASE.replace(noise_std=1.0),
}


def layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "Conv3d 32->32 3^3, 32^3, b2": (nn.Conv3d(32, 32, 3, padding=1).eval(), torch.randn(2, 32, 32, 32, 32)),
        "ConvT2d 64->32 4x4 s2, 32^2, b32": (nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1).eval(),
                                             torch.randn(32, 64, 32, 32)),
    }


def main() -> None:
    args = bench_args(__doc__, repeats=10, threads=2)
    print(f"{'layer':<34} {'case':<12} {'fp32 ms':>9} {'abfp ms':>9} {'ratio':>7}")
    rows = []
    for name, (layer, x) in layers().items():
        for case, cfg in CASES.items():
            conv = abfp.convert(layer, cfg)
            with torch.no_grad():
                t_fp, t_ab = time_interleaved([lambda: layer(x), lambda: conv(x)], args.repeats)
            ratios = [b / a for a, b in zip(t_fp, t_ab)]
            row = dict(layer=name, case=case, fp32_ms=1e3 * statistics.median(t_fp),
                       abfp_ms=1e3 * statistics.median(t_ab), ratio=statistics.median(ratios))
            rows.append(row)
            print(f"{name:<34} {case:<12} {row['fp32_ms']:>9.1f} {row['abfp_ms']:>9.1f} {row['ratio']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
