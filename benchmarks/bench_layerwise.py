"""Bias correction (``abfp.finetune.bias_correct``) of a tuned plan, measured on held-out inputs.

The plan (``--plan-from RESULT.json:STAGE`` or a plan JSON) is bias-corrected on the first
``--samples`` calibration inputs (the task's calibration split: other photos / sentences than the
evaluation ones), then the plan with the corrected weights is evaluated on the first ``--eval``
evaluation inputs: the task's metric and extras with standard errors, wall and process CPU time.
``--rounds R`` corrects R times in a row (each round on the last one's model, noise seed = round).

    python3 benchmarks/bench_layerwise.py --plan-from docs/results/tune/efficientnet-I.json:gain --samples 64 \
        --out bc.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from abfp import zoo
from abfp.finetune.layerwise import bias_correct
from abfp.tune.api import _outputs, plan_outputs
from abfp.tune.cli import split_data
from bench_decompose import load_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="efficientnet-lite0")
    ap.add_argument("--plan-from", required=True)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--calibration", type=int, default=338)
    ap.add_argument("--eval", type=int, default=312)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--baseline", action="store_true", help="also evaluate the uncorrected plan")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    task = zoo.get(a.task)
    model = task.build_model().eval()
    cal, ev, _ = split_data(task, a.calibration, a.eval)
    metrics = [task.metric, *zoo.extra_metrics(a.task)]
    plan = load_plan(a.plan_from)
    t0, c0 = time.perf_counter(), time.process_time()
    ref = _outputs(model, ev, a.batch_size)
    rows: list[dict] = []

    def evaluate(name: str, m: torch.nn.Module, **extra) -> None:
        out = plan_outputs(m, plan, ev, a.batch_size, 0)
        rows.append({"stage": name, **extra, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                     **{x.name: x(out, ev.targets, ref) for x in metrics},
                     **{x.name + "_se": x.stderr(out, ev.targets, ref) for x in metrics}})
        print(rows[-1], flush=True)
        with open(a.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "load": open("/proc/loadavg").read().split()[:3],
                       "rows": rows}, f, indent=1)

    if a.baseline:
        evaluate("plan", model)
    m = model
    for r in range(a.rounds):
        c1, w1 = time.process_time(), time.perf_counter()
        res = bias_correct(m, cal.inputs, plan.base, overrides=plan.overrides(), exclude=plan.exclude,
                           samples=a.samples, seed=r)
        m = res.model
        rel = sorted(res.relative_error.items(), key=lambda kv: -kv[1])[:8]
        evaluate(f"bias-correct round {r + 1}", m, samples=a.samples, correct_cpu=time.process_time() - c1,
                 correct_wall=time.perf_counter() - w1, corrected=len(res.corrections), skipped=res.skipped,
                 largest_relative_error=rel)


if __name__ == "__main__":
    main()
