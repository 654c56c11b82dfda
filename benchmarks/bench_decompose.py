"""Where a plan's fidelity loss comes from: DAC quantisation, ADC resolution or device noise, and which layers.

On the task's evaluation inputs, a plan (``--plan-from RESULT.json:STAGE``, a ``bench_tune.py`` result's
stage, or a plan JSON written by ``abfp tune``) is evaluated as

* ``dacs only``: every module's device with the ADC made ideal (24 bits, gain 1: nothing saturates,
  one bin is n / (2**23 - 1)) and no noise: what the 8-bit input and weight DACs and the bfloat16
  tile scales alone lose;
* ``+ adc``: the plan's gains and 8-bit ADC, no noise;
* ``+ noise``: the plan as it is (noise one bin wide, the plan's repeats);
* with ``--dac-split``, ``weight dac only`` / ``input dac only``: the DACs-only device with the
  other DAC at 16 bits;

and, with ``--per-layer``, with one module at a time on its device (the plan's config, noise
included; every other module float32), ranked by KL: which layers carry the loss. ``--per-layer-mode
dacs`` puts the one module on its DAC-only device instead; ``--probe MODULE:GAIN:REPEATS`` (or
``MODULE:dacs``) evaluates one module alone at another setting; ``--float32 MODULE`` (repeatable):
the whole plan with those modules float32. JSON after every row (``--out``);
``--resume`` skips rows already in it.

    python3 benchmarks/bench_decompose.py --plan-from docs/results/tune/efficientnet-I.json:gain \
        --per-layer --out decompose.json
"""

from __future__ import annotations

import argparse

from abfp.config import ABFPConfig
from abfp.tune import DevicePlan
from abfp.tune.api import _product_modules
from plan_rows import Rows, load_plan, setup


def dacs_only(cfg: ABFPConfig) -> ABFPConfig:
    return cfg.replace(output_bits=24, gain=1.0, noise_std=0.0, repeats=1)


def noiseless(cfg: ABFPConfig) -> ABFPConfig:
    return cfg.replace(noise_std=0.0, repeats=1)


def mapped(plan: DevicePlan, modules: list[str], f) -> DevicePlan:
    return DevicePlan(f(plan.base), {m: f(plan.config_for(m)) for m in modules}, plan.exclude)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="efficientnet-lite0")
    ap.add_argument("--plan-from", required=True)
    ap.add_argument("--eval", type=int, default=312)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--probe", action="append", default=[],
                    help="MODULE:GAIN:REPEATS or MODULE:dacs: that module alone on that device (repeatable)")
    ap.add_argument("--float32", action="append", default=[],
                    help="MODULE: one row with the plan as it is but these modules float32 (repeatable)")
    ap.add_argument("--dac-split", action="store_true", help="also the 8-bit weight DAC alone, the input DAC alone")
    ap.add_argument("--per-layer-mode", choices=["plan", "dacs"], default="plan")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    model, cal, ev, metrics = setup(a.task, 1, a.eval)
    plan = load_plan(a.plan_from)
    modules = _product_modules(model, plan, tuple(t[:1] for t in cal.inputs))
    rows = Rows(a.out, model, ev, metrics, a.batch_size, a.resume, modules=modules)

    def evaluate(name: str, p: DevicePlan, **extra) -> None:
        rows.evaluate(name, model, p, **extra)

    evaluate("dacs only", mapped(plan, modules, dacs_only))
    evaluate("+ adc", mapped(plan, modules, noiseless))
    evaluate("+ noise", plan)
    if a.dac_split:
        evaluate("weight dac only", mapped(plan, modules, lambda c: dacs_only(c).replace(input_bits=16)))
        evaluate("input dac only", mapped(plan, modules, lambda c: dacs_only(c).replace(weight_bits=16)))
    if a.float32:
        keep = tuple(a.float32)
        evaluate(f"plan with {', '.join(keep)} float32",
                 DevicePlan(plan.base, {k: v for k, v in plan.modules.items() if k not in keep}, plan.exclude + keep))
    for spec in a.probe:
        m, *setting = spec.split(":")
        cfg = dacs_only(plan.config_for(m)) if setting == ["dacs"] else \
            plan.config_for(m).replace(gain=float(setting[0]), repeats=int(setting[1]))
        others = tuple(x for x in modules if x != m)
        evaluate(f"probe {spec}", DevicePlan(cfg, {m: cfg}, plan.exclude + others), module=m, config=cfg.label())
    if a.per_layer:
        for m in modules:
            cfg = plan.config_for(m) if a.per_layer_mode == "plan" else dacs_only(plan.config_for(m))
            others = tuple(x for x in modules if x != m)
            evaluate(f"only {m}", DevicePlan(cfg, {m: cfg}, plan.exclude + others), module=m, mode=a.per_layer_mode)


if __name__ == "__main__":
    main()
