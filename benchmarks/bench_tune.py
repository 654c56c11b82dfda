"""Measure ``abfp.tune`` on a zoo model: single gain vs saturation auto gain vs error-minimising
gain vs + repeats, on held-out samples (calibration = the first samples, evaluation = the next).

    python3 benchmarks/bench_tune.py --task efficientnet-lite0 --calibration 16 --eval 44 --out r.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from abfp import ABFPConfig, zoo
from abfp.tune import DevicePlan, choose_gains, evaluate_plan, tune
from abfp.tune.api import _energy, _outputs, _product_modules
from abfp.energy import EnergyParams
from abfp.zoo.base import KL, COSINE, Dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", required=True)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--gain-samples", type=int, default=16)
    ap.add_argument("--metric", choices=["task", "kl", "cosine"], default="task")
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--max-repeats", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    task = zoo.get(a.task)
    model = task.build_model().eval()
    data = task.load_data()
    cal = data.take(a.calibration)
    ev = Dataset(tuple(t[a.calibration:a.calibration + a.eval] for t in data.inputs),
                 None if data.targets is None else data.targets[a.calibration:a.calibration + a.eval])
    metric = {"task": task.metric, "kl": KL, "cosine": COSINE}[a.metric]
    cfg = ABFPConfig()
    t0 = time.perf_counter()
    res = tune(model, cal.inputs, cfg, metric=metric, target=a.target, calibration_targets=cal.targets,
               eval_inputs=ev.inputs, eval_targets=ev.targets, gain_samples=a.gain_samples,
               max_repeats=a.max_repeats, batch_size=a.batch_size, progress=lambda s: print(s, flush=True))
    total = time.perf_counter() - t0
    print(res.table(), flush=True)
    # the saturation rule (today's auto gain), for comparison, and every stage's task metrics
    t1 = time.perf_counter()
    sat = choose_gains(model, tuple(t[:a.gain_samples] for t in cal.inputs), cfg, rule="saturation")
    sat_s = time.perf_counter() - t1
    e_in = tuple(t[:4] for t in cal.inputs)
    mods = _product_modules(model, DevicePlan(cfg), e_in)
    sat_plan = DevicePlan(cfg, {m: cfg.replace(gain=sat.get(m, cfg.gain)) for m in mods})
    ref = _outputs(model, ev, a.batch_size)
    metrics = [task.metric, *zoo.extra_metrics(a.task)]
    rows = []
    plans = [("single gain G=8", res.stages[0].plan, res.stages[0].seconds),
             ("auto gain (saturation)", sat_plan, sat_s)] + [(s.name, s.plan, s.seconds) for s in res.stages[1:]]
    for name, plan, secs in plans:
        vals = {m.name: evaluate_plan(model, plan, ev, m, ref, a.batch_size, 0) for m in metrics}
        rows.append({"stage": name, "metrics": vals, "energy_pj": _energy(model, plan, e_in, EnergyParams()),
                     "seconds": secs, "plan": plan.to_dict()})
        print(name, vals, rows[-1]["energy_pj"], flush=True)
    fp32 = {m.name: m(ref, ev.targets, ref) for m in metrics}
    json.dump({"task": a.task, "calibration": a.calibration, "eval": len(ev), "fp32": fp32, "rows": rows,
               "tune_seconds": total, "tune": res.to_dict()}, open(a.out, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
