"""Measure ``abfp.tune`` on a zoo model, stage by stage, on held-out inputs.

Rows: single gain (the base device), auto gain (the saturation rule), the error-minimising gain
(with ``--gain-tolerance``), + repeats, + label-free finetuning (``--finetune``). Each row: the
task's metric ± its standard error over the evaluation samples, the extra metrics (KL, top-1
agreement), energy per inference and its ratio to the single-gain device, wall time of the stage.
Calibration and finetuning use the task's calibration split (else its training split), exactly as
``abfp tune`` does (:func:`abfp.tune.cli.split_data`); evaluation the task's evaluation data.

    python3 benchmarks/bench_tune.py --task fashion-cnn --calibration 256 --eval 1000 --out r.json
    python3 benchmarks/bench_tune.py --task minilm-l6 --calibration 64 --eval 192 --gain-tolerance 0.25 \
        --finetune distil-qat --finetune-steps 40 --out r.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from abfp import ABFPConfig, zoo
from abfp.energy import EnergyParams
from abfp.tune import DevicePlan, choose_gains, power_of_two_gains, tune
from abfp.tune.api import _energy, _outputs, _product_modules, plan_outputs
from abfp.tune.cli import split_data
from abfp.zoo.base import COSINE, KL


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", required=True)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--gain-samples", type=int, default=16)
    ap.add_argument("--gain-tolerance", type=float, default=0.0)
    ap.add_argument("--max-gain", type=float, default=256.0)
    ap.add_argument("--gain-descent", action="store_true")
    ap.add_argument("--gain-rule", choices=["error", "energy"], default="error")
    ap.add_argument("--gains-per-octave", type=int, default=1, help="candidate gains 2**(j/N) up to --max-gain")
    ap.add_argument("--energy-budget", type=float, default=None, help="energy rule: x the single-gain energy")
    ap.add_argument("--refine", type=int, default=0, help="energy rule: modules checked on the model (abfp.tune.refine)")
    ap.add_argument("--refine-passes", type=int, default=1, help="refinement passes at most (0: until none moves)")
    ap.add_argument("--refine-fill", action="store_true", help="spend what the refinement leaves (fill_budget)")
    ap.add_argument("--refine-margin", type=float, default=0.0, help="a refined move must win by this fraction")
    ap.add_argument("--metric", choices=["task", "kl", "cosine"], default="task", help="tuning metric")
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--max-repeats", type=int, default=16)
    ap.add_argument("--no-repeats", action="store_true")
    ap.add_argument("--no-saturation", action="store_true", help="skip the saturation-rule row")
    ap.add_argument("--finetune", choices=["none", "distil-qat", "distil-dnf"], default="none")
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--finetune-lr", type=float, default=1e-5)
    ap.add_argument("--finetune-batch-size", type=int, default=32)
    ap.add_argument("--finetune-loss", choices=["kl", "cosine", "mse"], default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--energy-samples", type=int, default=1, help="inputs accounted together for the energy")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    task = zoo.get(a.task)
    model = task.build_model().eval()
    cal, ev, source = split_data(task, a.calibration, a.eval)
    metric = {"task": task.metric, "kl": KL, "cosine": COSINE}[a.metric]
    metrics = [task.metric, *zoo.extra_metrics(a.task)]
    cfg = ABFPConfig()
    ft_opts = None
    if a.finetune != "none":
        ft_opts = {"steps": a.finetune_steps, "lr": a.finetune_lr, "batch_size": a.finetune_batch_size}
        if a.finetune_loss:
            ft_opts["loss"] = a.finetune_loss
    t0 = time.perf_counter()
    res = tune(model, cal.inputs, cfg, metric=metric, target=a.target, calibration_targets=cal.targets,
               eval_inputs=ev.inputs, eval_targets=ev.targets, gain_samples=a.gain_samples,
               gain_tolerance=a.gain_tolerance, gain_descent=a.gain_descent, max_gain=a.max_gain, repeats=not a.no_repeats,
               gain_rule=a.gain_rule, energy_budget=a.energy_budget, refine=a.refine,
               refine_passes=a.refine_passes or None, refine_fill=a.refine_fill,
               refine_margin=a.refine_margin,
               gains=power_of_two_gains(a.max_gain, a.gains_per_octave) if a.gains_per_octave > 1 else None,
               max_repeats=a.max_repeats, finetune=None if a.finetune == "none" else a.finetune,
               finetune_options=ft_opts, extra_metrics=[m for m in metrics if m.name != metric.name],
               batch_size=a.batch_size, energy_samples=a.energy_samples, progress=lambda s: print(s, flush=True))
    total = time.perf_counter() - t0
    print(res.table(), flush=True)
    ref = _outputs(model, ev, a.batch_size)
    e_in = tuple(t[:a.energy_samples] for t in cal.inputs)
    rows = []

    def row(name: str, plan: DevicePlan, secs: float, m: torch.nn.Module = model) -> None:  # a plan tune did not make
        out = plan_outputs(m, plan, ev, a.batch_size, 0)
        vals = {x.name: x(out, ev.targets, ref) for x in metrics}
        errs = {x.name: x.stderr(out, ev.targets, ref) for x in metrics}
        rows.append({"stage": name, "metrics": vals, "stderr": errs, "energy_pj": _energy(m, plan, e_in, EnergyParams()),
                     "seconds": secs, "plan": plan.to_dict()})
        print(name, vals, errs, rows[-1]["energy_pj"], flush=True)

    def from_stage(s) -> None:  # tune measured it already (same inputs, same noise seed)
        vals = {metric.name: s.metric, **s.extra}
        errs = {metric.name: s.stderr, **s.extra_stderr}
        rows.append({"stage": s.name, "metrics": vals, "stderr": errs, "energy_pj": s.energy, "seconds": s.seconds,
                     "plan": s.plan.to_dict(), "note": s.note})

    from_stage(res.stages[0])
    if not a.no_saturation:  # today's auto gain, for comparison
        t1 = time.perf_counter()
        sat = choose_gains(model, tuple(t[:a.gain_samples] for t in cal.inputs), cfg, rule="saturation")
        mods = _product_modules(model, DevicePlan(cfg), e_in)
        row("auto gain (saturation)", DevicePlan(cfg, {m: cfg.replace(gain=sat.get(m, cfg.gain)) for m in mods}),
            time.perf_counter() - t1)
    for s in res.stages[1:]:
        from_stage(s)
    fp32 = {x.name: x(ref, ev.targets, ref) for x in metrics}
    e0 = rows[0]["energy_pj"]
    print(f"\n| stage | {' | '.join(x.name for x in metrics)} | energy/inf (uJ) | x single | time (s) |")
    for r in rows:
        cells = " | ".join(f"{r['metrics'][x.name]:.4g}" + (f" ± {r['stderr'][x.name]:.2g}" if r["stderr"].get(x.name)
                                                             is not None else "") for x in metrics)
        print(f"| {r['stage']} | {cells} | {r['energy_pj'] / 1e6:.4g} | {r['energy_pj'] / e0:.2f} | {r['seconds']:.0f} |")
    with open(a.out, "w") as f:
        json.dump({"task": a.task, "command": " ".join(sys.argv), "calibration": len(cal), "calibration_source": source,
                   "eval": len(ev), "fp32": fp32, "rows": rows, "tune_seconds": total, "tune": res.to_dict()},
                  f, indent=1, default=str)


if __name__ == "__main__":
    main()
