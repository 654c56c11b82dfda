"""Speed of convolutions on wide ADC plans: the compiled float64 epilogue against the torch path.

A wide plan (:class:`abfp.numerics.AdcPlan` form C: ``L(b_y)`` does not divide ``L(b_x)
L(b_w)``, e.g. 10-bit DACs with a 12-bit ADC, or 8-bit DACs with a 12-bit ADC) does its ADC
step in float64. Convolutions on such plans run through ``fused.epilogue_cols`` in float64; before,
they ran as torch operations (float64 copies, the counter noise in torch). Both, and the
float32 layer as the baseline, are timed interleaved in the same run (float32, compiled,
torch, float32, ...); the figures that matter are the median ratios. Layers: EfficientNet-
Lite0-like (a 3x3 convolution 32->32 at 56x56, a pointwise 1x1 192->1152 at 7x7, a depthwise
5x5 on 480 channels at 14x14), batch 8. Devices: 10/10/12 and 8/8/12 bits (w/x/y), n = 128,
G = 8, noise one bin wide. Usage:

    python benchmarks/bench_wide_adc.py [--repeats 7] [--threads 1] [--json out.json]
"""

from __future__ import annotations


import torch
from torch import nn

import abfp
from abfp import functional as AF
from abfp.numerics import AdcPlan, fused
from timing import bench_args, ratio_row, time_interleaved, write_rows  # benchmarks/timing.py

CASES = {f"{w}/{x}/{y}": abfp.ABFPConfig(tile_width=128, gain=8.0, weight_bits=w, input_bits=x, output_bits=y,
                                        noise_std=0.2887, seed=0) for w, x, y in ((10, 10, 12), (8, 8, 12))}


def layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "3x3 32->32, 56^2": (nn.Conv2d(32, 32, 3, padding=1).eval(), torch.randn(8, 32, 56, 56)),
        "1x1 192->1152, 7^2": (nn.Conv2d(192, 1152, 1).eval(), torch.randn(8, 192, 7, 7)),
        "dw 5x5 480, 14^2": (nn.Conv2d(480, 480, 5, padding=2, groups=480).eval(), torch.randn(8, 480, 14, 14)),
    }


def main() -> None:
    args = bench_args(__doc__, repeats=7, threads=1)
    print(f"{'layer':<22} {'bits':<9} {'fp32 ms':>8} {'compiled':>9} {'torch':>9} {'x fp32':>7} {'x fp32':>7} {'speed-up':>8}")
    rows = []
    for name, (layer, x) in layers().items():
        for case, cfg in CASES.items():
            assert AdcPlan.for_config(cfg).wide
            conv = abfp.convert(layer, cfg)

            def run(on: bool):
                fused.AVAILABLE = on
                AF.clear_cache()
                abfp.nn.reseed(conv)  # the same noise in every call: the two paths' numbers compared
                try:
                    return conv(x)
                finally:
                    fused.AVAILABLE = True

            with torch.no_grad():
                times = time_interleaved([lambda: layer(x), lambda: run(True), lambda: run(False)], args.repeats)
                same = torch.equal(run(True), run(False))
            row = ratio_row(dict(layer=name, bits=case, identical=same), ["fp32", "compiled", "torch"], times)
            row["speedup"] = row["torch_ratio"] / row["compiled_ratio"]
            rows.append(row)
            print(f"{name:<22} {case:<9} {row['fp32_ms']:>8.1f} {row['compiled_ms']:>9.1f} {row['torch_ms']:>9.1f} "
                  f"{row['compiled_ratio']:>7.1f} {row['torch_ratio']:>7.1f} {row['speedup']:>8.2f}"
                  + ("" if same else "  DIFFERENT NUMBERS"))
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
