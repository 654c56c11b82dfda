"""Speed of depthwise convolutions: the direct kernel against the patch path and float32.

``fused.grouped_direct`` computes a grouped convolution with few outputs per group (depthwise:
one) in one pass per group and image: block scales, DAC codes, exact tile products, ADC and
tile sum, a few output rows at a time, nothing but the output in memory. Before it, such a
convolution took the path of every other one: patch codes for all groups (``patch_encode``),
one batched GEMM over groups (``1 x K`` by ``K x P`` per group, K = 9 or 25) and the compiled
epilogue. Both, and the float32 layer, are timed interleaved in the same run (CPU time,
``time.process_time``); the figures that matter are the median ratios. Layers: EfficientNet-
Lite0's depthwise convolutions (3x3 stride 2 on 96 channels at 112x112, 3x3 on 144 channels at
56x56, 5x5 on 480 channels at 14x14, 3x3 on 1152 channels at 7x7... as ``LAYERS``), batch 8.
Devices: n = 128, G = 8, noise one bin wide, 8/8/8 (narrow), 10/10/12 and 11/11/16 bits
(wide: float64 ADC arithmetic and float64 tile products). Usage:

    python benchmarks/bench_grouped.py [--repeats 5] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import time

import torch
from torch import nn

import abfp
from abfp.numerics import conv
from timing import bench_args, ratio_row, time_interleaved, write_rows  # benchmarks/timing.py

BITS = ((8, 8, 8), (10, 10, 12), (11, 11, 16))
#: name -> (channels, kernel, stride, input size)
LAYERS = {
    "dw 3x3 s2 96, 112^2": (96, 3, 2, 112),
    "dw 3x3 144, 56^2": (144, 3, 1, 56),
    "dw 5x5 480, 14^2": (480, 5, 1, 14),
    "dw 3x3 1152, 7^2": (1152, 3, 1, 7),
}


def main() -> None:
    args = bench_args(__doc__, repeats=5, threads=1)
    print(f"{'layer':<22} {'bits':<9} {'fp32 ms':>8} {'direct':>8} {'patches':>8} {'x fp32':>7} {'x fp32':>7} {'speed-up':>8}")
    rows = []
    torch.manual_seed(0)
    for name, (c, k, s, size) in LAYERS.items():
        layer = nn.Conv2d(c, c, k, stride=s, padding=k // 2, groups=c).eval()
        x = torch.randn(8, c, size, size)
        for bits in BITS:
            w, i, o = bits
            cfg = abfp.ABFPConfig(tile_width=128, gain=8.0, weight_bits=w, input_bits=i, output_bits=o,
                                  noise_std=0.2887, seed=0)
            dev = abfp.convert(layer, cfg)

            def run(direct: bool):
                conv.DIRECT_GROUPED = direct
                abfp.nn.reseed(dev)  # the same noise in every call: the two paths' numbers compared
                try:
                    return dev(x)
                finally:
                    conv.DIRECT_GROUPED = True

            with torch.no_grad():
                times = time_interleaved([lambda: layer(x), lambda: run(True), lambda: run(False)], args.repeats,
                                         clock=time.process_time)
                same = torch.equal(run(True), run(False))
            row = ratio_row(dict(layer=name, bits="/".join(map(str, bits)), identical=same),
                            ["fp32", "direct", "patches"], times)
            row["speedup"] = row["patches_ratio"] / row["direct_ratio"]
            rows.append(row)
            print(f"{name:<22} {row['bits']:<9} {row['fp32_ms']:>8.1f} {row['direct_ms']:>8.1f} {row['patches_ms']:>8.1f} "
                  f"{row['direct_ratio']:>7.1f} {row['patches_ratio']:>7.1f} {row['speedup']:>8.2f}"
                  + ("" if same else "  DIFFERENT NUMBERS"))
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
