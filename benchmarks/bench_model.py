"""Whole-model evaluation: time and peak memory of the device simulation against float32.

Each measurement runs in a fresh subprocess (so peak RSS belongs to that run alone):
float32 and ABFP alternate, ``--repeats`` times each, and the script prints the median
time ratio and the ratio of peak memory above the process's baseline (torch imported,
model and data loaded). Usage:

    python benchmarks/bench_model.py [--task fashion-cnn] [--samples 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
import abfp
from abfp import zoo
from abfp.evaluate import run_model
task, samples, threads, mode, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
t = zoo.get(task)
model = t.build_model()
data = t.load_data().take(samples)
if mode != "fp32":
    model = abfp.convert(model, abfp.ABFPConfig.from_json(mode), inplace=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # torch, model and data loaded
run_model(model, data.take(batch), batch)  # warm-up (weight encodings cached)
t0 = time.perf_counter()
run_model(model, data, batch)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_kb": peak, "base_kb": base}))
"""


def measure(task: str, samples: int, threads: int, mode: str, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, task, str(samples), str(threads), mode, str(batch)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import abfp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="fashion-cnn")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cases = {
        "ABFP n=128 G=8 noise 1 bin": abfp.ABFPConfig(),
        "ABFP n=128 G=8 no noise": abfp.ABFPConfig(noise_std=0.0),
        "ABFP n=8 G=1 noise 1 bin": abfp.ABFPConfig(tile_width=8, gain=1.0),
    }
    print(f"{args.task}, {args.samples} samples, batch {args.batch_size}, {args.threads} threads; medians of {args.repeats}")
    print(f"{'case':<28} {'fp32 s':>8} {'abfp s':>8} {'time x':>7} {'fp32 MB':>8} {'abfp MB':>8} {'mem x':>6}")
    for name, cfg in cases.items():
        fp, ab = [], []
        for _ in range(args.repeats):
            fp.append(measure(args.task, args.samples, args.threads, "fp32", args.batch_size))
            ab.append(measure(args.task, args.samples, args.threads, cfg.to_json(indent=None), args.batch_size))
        ratio = statistics.median(a["seconds"] / f["seconds"] for a, f in zip(ab, fp))
        mem_fp = statistics.median((f["peak_kb"] - f["base_kb"]) / 1024 for f in fp)
        mem_ab = statistics.median((a["peak_kb"] - a["base_kb"]) / 1024 for a in ab)
        print(f"{name:<28} {statistics.median(f['seconds'] for f in fp):>8.2f} "
              f"{statistics.median(a['seconds'] for a in ab):>8.2f} {ratio:>7.2f} {mem_fp:>8.1f} {mem_ab:>8.1f} "
              f"{(mem_ab / mem_fp if mem_fp > 0 else float('nan')):>6.2f}")


if __name__ == "__main__":
    main()
