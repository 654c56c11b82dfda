"""Label-free distil-QAT of a zoo model on one fixed device plan, measured before and after.

The plan is a row of a ``bench_tune.py`` JSON (``FILE:STAGE``). The student trains through the
plan's devices on calibration inputs ``[LO, HI)`` of the task's calibration split; the metric
(± standard error) is measured before and after on three sets: the first 64 training inputs
(fit), calibration inputs 0-64 (not trained on when LO >= 64) and the task's evaluation data
(held out), all on the plan with noise seed 0. The loss of every step is recorded. CPU time.

    python3 benchmarks/bench_distil_plan.py --plan docs/results/tune/minilm-H.json:gain --lr 1e-5 \\
        --steps 40 --batch-size 16 --train 64:256 --loss cosine --out r.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from abfp import zoo
from abfp.finetune.distillation import Distillation
from abfp.finetune.methods import qat
from abfp.tune import DevicePlan
from abfp.tune.api import _outputs, plan_outputs
from abfp.tune.cli import split_data
from abfp.zoo.base import Dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="minilm-l6")
    ap.add_argument("--plan", required=True, help="FILE.json:STAGE, a row of a bench_tune.py JSON")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train", default="64:256", help="LO:HI, calibration inputs to train on")
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--eval", type=int, default=192)
    ap.add_argument("--loss", choices=["kl", "cosine", "mse"], default="cosine")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    path, stage = a.plan.rsplit(":", 1)
    rows = json.load(open(path))["rows"]
    plan = DevicePlan.from_dict(next(r["plan"] for r in rows if r["stage"] == stage))
    lo, hi = (int(v) for v in a.train.split(":"))
    task = zoo.get(a.task)
    model = task.build_model().eval()
    cal, ev, _ = split_data(task, a.calibration, a.eval)
    train = Dataset(tuple(t[lo:hi] for t in cal.inputs))
    sets = {"fit": Dataset(tuple(t[:64] for t in train.inputs)), "calibration 0-64": Dataset(tuple(t[:64] for t in cal.inputs)),
            "held out": ev}
    refs = {k: _outputs(model, v, 64) for k, v in sets.items()}
    metric = task.metric

    def score(m: torch.nn.Module) -> dict[str, list[float]]:
        out = {}
        for k, v in sets.items():
            y = plan_outputs(m, plan, v, 64, 0)
            out[k] = [metric(y, None, refs[k]), metric.stderr(y, None, refs[k])]
        return out

    t0 = time.process_time()
    before = score(model)
    print("before", before, flush=True)
    losses: list[float] = []
    res = qat(model, train, plan.base, steps=a.steps, lr=a.lr, batch_size=a.batch_size, loss=Distillation(a.loss, 1.0),
              overrides=plan.overrides() or None, seed=0, progress=False, timing_steps=0, timing_every=0,
              callback=lambda s, v: losses.append(v))
    after = score(res.model)
    print("after", after, flush=True)
    with open(a.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "before": before, "after": after, "losses": losses,
                   "cpu_seconds": time.process_time() - t0}, f, indent=1)


if __name__ == "__main__":
    main()
