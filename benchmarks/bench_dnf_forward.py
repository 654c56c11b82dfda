"""Where a DNF forward's time goes over a float32 forward (issue 17, item 3): fashion-vit variants.

One process, the variants timed interleaved (thread CPU time, one thread, median of the rounds
after three warm-up rounds), each a forward at batch 64 in training mode:

- ``fp32``: the float32 model;
- ``dnf``: the converted model under :class:`~abfp.finetune.dnf.DNFNoise` (all sites noisy);
- ``nop``: the same with samplers that only take their key (the interception, no noise);
- ``nop-noattnmm``: ``nop`` without the attention products' histograms (attention runs
  without the function mode);
- ``nohist``: DNF with no histograms at all (the converted modules' wrappers only).

    python benchmarks/bench_dnf_forward.py [--rounds 40] [--model fashion-vit]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from abfp import zoo
from abfp.finetune.dnf import DNFNoise, build_histograms
from abfp.nn import convert
from bench_dnf import CONFIGS
from timing import training_batch  # benchmarks/timing.py


class _KeyOnly:
    """A sampler that takes its key and adds nothing."""

    def __call__(self, y: torch.Tensor, keys) -> torch.Tensor:
        keys.take()
        return y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--model", default="fashion-vit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, _, pool = training_batch(args.model, 64)
    base = zoo.get(args.model).build_model()
    fp32 = copy.deepcopy(base).float().train()
    dnf = convert(base, CONFIGS[args.model], inplace=False).float()
    hists = build_histograms(dnf, (pool[:128],))

    def variant(h, key_only=True):
        m = copy.deepcopy(dnf)
        noise = DNFNoise(m, h).attach()
        m.train()
        if key_only:
            noise.samplers = {s: _KeyOnly() for s in noise.samplers}
        return m

    no_attn = {k: v for k, v in hists.items() if ":matmul" not in k}
    cases = {"fp32": fp32, "dnf": variant(hists, False), "nop": variant(hists), "nop-noattnmm": variant(no_attn),
             "nohist": variant({})}
    times: dict[str, list[float]] = {k: [] for k in cases}
    clock = time.thread_time
    for r in range(args.rounds + 3):
        for k, m in cases.items():
            t = clock()
            m(x)
            if r >= 3:
                times[k].append(clock() - t)
    f = statistics.median(times["fp32"])
    for k, v in times.items():
        print(f"{k:14s} forward {statistics.median(v) * 1e3:7.2f} ms  over float32 {(statistics.median(v) - f) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
