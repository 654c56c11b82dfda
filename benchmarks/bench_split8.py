"""Wide plans' tile products on split int8 codes against the float64 GEMM, on EfficientNet-Lite0.

With 9-12-bit DACs at n = 128 a tile product can exceed 2**24, so the convolutions' code GEMMs
run in float64. ``conv.SPLIT8`` splits every code into int8 halves (``q = 32 h + l``) and runs
each tile product as four int8 GEMMs with exact int32 sums (``conv.split8_tiles``) where it
gains (``conv.use_split8``: few groups, K and output channels of at least 64: the wider
pointwise convolutions). One forward pass of the converted network on the first ``--crops``
crops, the split on and off interleaved in one process (CPU time, ``time.process_time``,
medians over ``--repeats`` rounds; the noise restarted before every pass), per layer kind
(forward hooks) and in all; the outputs must be identical. Usage:

    python benchmarks/bench_split8.py [--bits 11/11/16] [--crops 16] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import abfp
from abfp.numerics import conv
from abfp.zoo import efficientnet


def kind(mod: nn.Conv2d) -> str:
    if mod.groups > 1:
        return "depthwise"
    return "pointwise" if mod.kernel_size == (1, 1) else "dense"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="11/11/16", help="weights/inputs/ADC bits (default 11/11/16)")
    ap.add_argument("--crops", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wb, xb, yb = (int(b) for b in args.bits.split("/"))
    model = efficientnet.build_model()
    x = efficientnet.load_data().inputs[0][: args.crops]
    cfg = abfp.ABFPConfig(tile_width=128, weight_bits=wb, input_bits=xb, output_bits=yb, gain=8.0, noise_std=0.2887,
                          seed=0)
    m = abfp.convert(model, cfg)
    times: dict[str, float] = {}
    start: dict[nn.Module, float] = {}
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_pre_hook(lambda mod, inp: start.__setitem__(mod, time.process_time()))
            mod.register_forward_hook(lambda mod, inp, out: times.__setitem__(
                kind(mod), times.get(kind(mod), 0.0) + time.process_time() - start[mod]))
    res: dict[bool, list[tuple[float, dict[str, float]]]] = {True: [], False: []}
    outs = {}
    with torch.no_grad():
        for split in (True, False):  # compile and encode the weights first
            conv.SPLIT8 = split
            m(x[:2])
        for _ in range(args.repeats):
            for split in (True, False):
                conv.SPLIT8 = split
                times.clear()
                abfp.reseed(m, 0)
                t0 = time.process_time()
                outs[split] = m(x)
                res[split].append((time.process_time() - t0, dict(times)))
        fp = []
        for _ in range(args.repeats):
            t0 = time.process_time()
            model(x)
            fp.append(time.process_time() - t0)
    conv.SPLIT8 = True
    print(f"EfficientNet-Lite0, {args.crops} crops, {args.bits} n=128 G=8 noise 0.2887, {args.threads} thread(s), "
          f"medians of {args.repeats}; identical outputs: {torch.equal(outs[True], outs[False])}")
    print("| path | pass CPU s | pointwise | dense | depthwise |")
    print("|---|---|---|---|---|")
    for split in (True, False):
        med = lambda k: statistics.median(tt.get(k, 0.0) for _, tt in res[split])  # noqa: E731
        print(f"| {'split int8' if split else 'float64 GEMM'} | {statistics.median(t for t, _ in res[split]):.3f} | "
              f"{med('pointwise'):.3f} | {med('dense'):.3f} | {med('depthwise'):.3f} |")
    print(f"| float32 model | {statistics.median(fp):.3f} | | | |")


if __name__ == "__main__":
    main()
