"""Bias correction (``abfp.finetune.bias_correct``) of a tuned plan, measured on held-out inputs.

The plan (``--plan-from RESULT.json:STAGE`` or a plan JSON) is bias-corrected on the first
``--samples`` calibration inputs (the task's calibration split: other photos / sentences than the
evaluation ones), then the plan with the corrected weights is evaluated on the first ``--eval``
evaluation inputs: the task's metric and extras with standard errors, wall and process CPU time.
``--rounds R`` corrects R times in a row (each round on the last one's model, noise seed = round);
``--target local``: the classic per-layer correction (each module's own error on its device inputs).
The calibration inputs are spread evenly over the split (``abfp.finetune.layerwise.spread``).

    python3 benchmarks/bench_layerwise.py --plan-from docs/results/tune/efficientnet-I.json:gain --samples 64 \
        --out bc.json
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from abfp.finetune.layerwise import bias_correct
from plan_rows import Rows, load_plan, setup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="efficientnet-lite0")
    ap.add_argument("--plan-from", required=True)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--calibration", type=int, default=338)
    ap.add_argument("--eval", type=int, default=312)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--target", choices=["float32", "local"], default="float32")
    ap.add_argument("--correct-on", choices=["calibration", "eval"], default="calibration",
                    help="eval: a diagnostic only (the correction sees the evaluation inputs): does it help "
                         "when the inputs' distribution is the one evaluated?")
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--baseline", action="store_true", help="also evaluate the uncorrected plan")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, cal, ev, metrics = setup(a.task, a.calibration, a.eval)
    plan = load_plan(a.plan_from)
    rows = Rows(a.out, model, ev, metrics, a.batch_size)

    def evaluate(name: str, m: torch.nn.Module, **extra) -> None:
        rows.evaluate(name, m, plan, **extra)

    if a.baseline:
        evaluate("plan", model)
    m = model
    for r in range(a.rounds):
        c1, w1 = time.process_time(), time.perf_counter()
        res = bias_correct(m, (cal if a.correct_on == "calibration" else ev).inputs, plan.base, overrides=plan.overrides(),
                           exclude=[re.escape(e) for e in plan.exclude], samples=a.samples, seed=r, target=a.target)
        m = res.model
        rel = sorted(res.relative_error.items(), key=lambda kv: -kv[1])[:8]
        evaluate(f"bias-correct ({a.target}, on {a.correct_on}) round {r + 1}", m, samples=a.samples, correct_cpu=time.process_time() - c1,
                 correct_wall=time.perf_counter() - w1, corrected=len(res.corrections), skipped=res.skipped,
                 largest_relative_error=rel)


if __name__ == "__main__":
    main()
