"""How much noise DNF's histograms draw at each site of EfficientNet-Lite0 on a tuned plan, against the ``dy`` they were fitted to.

The same ``dy`` as ``bench_distil_aug.py --method dnf`` (the plan converted with seed ``--seed``, the same
``--dnf-samples`` calibration crops as :class:`abfp.finetune.methods.DNFMethod` picks, device noise restarted
at the plan's seed), fitted per layer and per output channel with ``--smoothing`` (the library's default,
+0.5 per bin, and 0). Per site: the raw ``std(dy)``, ``rms(y_fp32)``, the samples per histogram row and the
standard deviation of what each histogram draws (per channel: the root of the mean of the channels' variances,
each channel having the same number of samples); ``inflation`` is drawn / raw. Writes ``--json``.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_dnf_histograms.py --json hist.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from abfp import zoo
from abfp.finetune.dnf import channel_dim_of, record_differentials
from abfp.finetune.histogram import Histogram
from abfp.nn import reseed
from plan_rows import load_plan  # benchmarks/plan_rows.py


def drawn_std(h: Histogram) -> float:
    return math.sqrt(float(h.variance().mean()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan-from", default="docs/results/tune/efficientnet-I.json:gain")
    ap.add_argument("--dnf-samples", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoothing", default="0.5,0", help="comma-separated smoothings to fit")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    task = zoo.get("efficientnet-lite0")
    model = load_plan(a.plan_from).with_seed(a.seed).convert(task.build_model().eval())
    cal = task.load_calibration()
    g = torch.Generator().manual_seed(a.seed * 1_000_003 + 104_729)  # DNFMethod.prepare's choice of crops
    idx = torch.randperm(len(cal), generator=g)[: min(a.dnf_samples, len(cal))]
    reseed(model, 0)
    rec = record_differentials(model, tuple(t[idx] for t in cal.inputs))
    smoothings = [float(s) for s in a.smoothing.split(",")]
    rows = []
    for site, r in rec.items():
        dy = torch.cat([t.reshape(-1) for t in r.dy])
        d = channel_dim_of(r.kind, r.dy[0].ndim)
        chan = torch.cat([t.movedim(d, 0).reshape(t.shape[d], -1) for t in r.dy], dim=1)
        row = {"site": site, "raw_std": float(dy.double().std()), "y_rms": r.y_rms, "channels": chan.shape[0],
               "samples_per_channel": chan.shape[1],
               "channel_std_spread": float(chan.double().std(1).max() / chan.double().std(1).clamp_min(1e-30).min())}
        for s in smoothings:
            row[f"layer_drawn_std@{s}"] = drawn_std(Histogram.fit(dy, smoothing=s))
            row[f"channel_drawn_std@{s}"] = drawn_std(Histogram.fit(chan, smoothing=s, channel_dim=0))
        rows.append(row)
        print(site, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "site"}, flush=True)
    with open(a.json, "w") as f:
        json.dump({"args": vars(a), "cpu": time.process_time() - c0, "wall": time.perf_counter() - t0,
                   "load": os.getloadavg()[0], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
