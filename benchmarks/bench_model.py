"""Whole-model evaluation: time and peak memory of the device simulation against float32.

Time: float32 and each device configuration run interleaved in one process (A, B, C, A,
B, C, ...) after a warm-up batch, ``--repeats`` times; the script prints median seconds and
the median ratio to float32. The model runs as it is built (NCHW), and once more converted
to channels-last memory format (``model.to(memory_format=torch.channels_last)``), against
float32 in the same format: the simulated convolutions keep the layout they are given, as
``F.conv2d`` does, and pooling is several times faster channels-last on CPU.

Memory: each configuration runs once more in a fresh subprocess with glibc told to serve
every block above 64 KiB straight from ``mmap`` and to return it on free
(``MALLOC_MMAP_THRESHOLD_``), so that the peak RSS follows the peak of live tensors; the
figure (``peak MB``) is the peak RSS of the evaluation (``VmHWM``, reset through
``/proc/self/clear_refs``) above the RSS after a warm-up batch, i.e. the memory the
evaluation's batches need. ``warm-up MB`` is what the warm-up batch left resident: library
code paged in on first use (int8 GEMM kernels and the like), the weight encodings and the
simulation's reusable scratch buffers. Linux only.
Usage:

    python benchmarks/bench_model.py [--task fashion-cnn] [--samples 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

MEMORY_CHILD = r"""
import json, sys, torch
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
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # kB
loaded = status("VmRSS")  # torch, model and data loaded
run_model(model, data.take(batch), batch)  # warm-up: library code paged in, caches and scratch filled
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
run_model(model, data, batch)
print(json.dumps({"peak_mb": (status("VmHWM") - base) / 1024, "warmup_mb": (base - loaded) / 1024}))
"""


def peak_memory_mb(task: str, samples: int, threads: int, mode: str, batch: int) -> tuple[float, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, task, str(samples), str(threads), mode, str(batch)],
                         capture_output=True, text=True, check=True, env=env)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return float(rec["peak_mb"]), float(rec["warmup_mb"])


def main() -> None:
    import torch

    import abfp
    from abfp import zoo
    from abfp.evaluate import run_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="fashion-cnn")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by process CPU time instead of wall clock (steadier on a machine shared with other jobs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = {
        "ABFP n=128 G=8 noise 1 bin": abfp.ABFPConfig(),
        "ABFP n=128 G=8 no noise": abfp.ABFPConfig(noise_std=0.0),
        "ABFP n=8 G=1 noise 1 bin": abfp.ABFPConfig(tile_width=8, gain=1.0),
    }
    task = zoo.get(args.task)
    data = task.load_data().take(args.samples)
    cl = torch.channels_last
    models = {"float32": task.build_model().eval(),
              "float32 channels-last": task.build_model().eval().to(memory_format=cl)}
    for name, cfg in cases.items():
        models[name] = abfp.convert(task.build_model().eval(), cfg, inplace=True)
    models["ABFP n=128 G=8 noise, channels-last"] = abfp.convert(
        task.build_model().eval().to(memory_format=cl), cases["ABFP n=128 G=8 noise 1 bin"], inplace=True)
    times: dict[str, list[float]] = {k: [] for k in models}
    clock = time.process_time if args.cpu_time else time.perf_counter
    for m in models.values():
        run_model(m, data.take(args.batch_size), args.batch_size)  # warm-up (weight encodings cached)
    for _ in range(args.repeats):
        for k, m in models.items():
            t0 = clock()
            run_model(m, data, args.batch_size)
            times[k].append(clock() - t0)
    print(f"{args.task}, {args.samples} samples, batch {args.batch_size}, torch {torch.__version__}, "
          f"{args.threads} threads, {platform.machine()}; medians of {args.repeats}"
          f"{' (process CPU time)' if args.cpu_time else ''}")
    print("time x: against float32 in the same memory format (channels-last rows: against float32 channels-last)")
    print(f"{'case':<36} {'seconds':>8} {'time x':>7} {'peak MB':>8} {'mem x':>6} {'warm-up MB':>11}")
    mem_fp = None if args.no_memory else peak_memory_mb(args.task, args.samples, args.threads, "fp32",
                                                          args.batch_size)
    for k, ts in times.items():
        base = times["float32 channels-last" if "channels-last" in k else "float32"]
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        mem = ""
        if mem_fp is not None and k in cases:
            mb, warm = peak_memory_mb(args.task, args.samples, args.threads, cases[k].to_json(indent=None),
                                      args.batch_size)
            mem = f"{mb:>8.1f} {mb / mem_fp[0]:>6.2f} {warm:>11.1f}"
        elif mem_fp is not None and k == "float32":
            mem = f"{mem_fp[0]:>8.1f} {1.0:>6.2f} {mem_fp[1]:>11.1f}"
        print(f"{k:<36} {statistics.median(ts):>8.3f} {ratio:>7.2f} {mem}")


if __name__ == "__main__":
    main()
