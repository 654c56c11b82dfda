"""DNF training step against a float32 training step of the same model (issue 17, item 3).

A step is forward, cross-entropy, backward and an AdamW update on one batch, in training
mode. The float32 model and the DNF model (converted, histograms recorded on 128 training
images, noise injected at every site) are timed interleaved in one loop (fp32, DNF, fp32,
DNF, ...), so machine load hits both alike; the figure is the median of the per-round
ratios DNF / float32. With ``--eager`` a third case times the eager torch sampler.

    python3 benchmarks/bench_dnf.py [--models fashion-cnn,fashion-vit] [--repeats 20] [--threads 1] [--cpu-time]
"""

from __future__ import annotations

import copy
import json
import time


from abfp import ABFPConfig, zoo
from abfp.finetune import sampler
from abfp.finetune.dnf import DNFNoise, build_histograms
from abfp.nn import convert
from timing import model_bench_args, ratio_row, time_interleaved, training_batch, training_step, write_rows  # benchmarks/timing.py

#: the issue's finetuning scenarios (docs/finetune.md): A for the CNN, C for the transformer
CONFIGS = {"fashion-cnn": ABFPConfig(noise_std=2.0, seed=0),
           "fashion-vit": ABFPConfig(gain=1.0, noise_std=0.2887, seed=0)}


def _options(ap) -> None:
    ap.add_argument("--eager", action="store_true", help="also time the eager torch sampler")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by process CPU time instead of wall clock (steadier on a machine shared with other jobs)")


def main() -> None:
    args = model_bench_args(__doc__, _options)
    clock = time.process_time if args.cpu_time else time.perf_counter
    rows = []
    for name in args.models.split(","):
        x, y, pool = training_batch(name, args.batch_size)
        calib = (pool[:128],)
        base = zoo.get(name).build_model()
        fp32 = copy.deepcopy(base).float().train()
        dnf = convert(base, CONFIGS[name], inplace=False).float()
        hists = build_histograms(dnf, calib)
        cases = {"fp32": (fp32, None), "dnf": (dnf, "auto")}
        if args.eager:
            cases["dnf-eager"] = (copy.deepcopy(dnf), "eager")
        for m, backend in cases.values():
            if backend is not None:
                DNFNoise(m, hists, backend=backend).attach()
        times = time_interleaved([training_step(m, x, y) for m, _ in cases.values()], args.repeats, clock)
        row = ratio_row({"model": name, "threads": args.threads, "repeats": args.repeats, "batch": args.batch_size,
                         "sampler": sampler.backend_in_use("auto"), "sampler_version": sampler.SAMPLER_VERSION,
                         "clock": "process CPU" if args.cpu_time else "wall"}, list(cases), times)
        rows.append(row)
        print(json.dumps(row))
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
