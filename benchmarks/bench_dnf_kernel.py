"""The compiled DNF noise kernel alone: ns per element of ``alias_kernel.launch`` on a float32 array.

One thread, a 100-bin histogram of standard normal samples (128 slots: the AVX-512 pass where
the CPU has it), keys 1, 2, ... per call; the median of ``--calls`` calls by process CPU time.

    python benchmarks/bench_dnf_kernel.py [--sizes 16384,200704] [--calls 3000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from abfp.finetune import alias_kernel
from abfp.finetune.histogram import Histogram


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16384,200704")
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not alias_kernel.usable():
        raise SystemExit("the compiled sampler is not usable here (numba absent)")
    hist = Histogram.fit(torch.randn(10000, generator=torch.Generator().manual_seed(0)), bins=100)
    tables = alias_kernel.kernel_args(*hist.kernel_tables())
    for size in (int(s) for s in args.sizes.split(",")):
        y = np.zeros(size, np.float32)
        alias_kernel.launch(y, size, 0, *tables)  # compile / load from the cache
        times = []
        for i in range(args.calls):
            t0 = time.process_time_ns()
            alias_kernel.launch(y, size, 1 + i, *tables)
            times.append(time.process_time_ns() - t0)
        print(json.dumps({"elements": size, "calls": args.calls, "ns_per_element": statistics.median(times) / size}))


if __name__ == "__main__":
    main()
