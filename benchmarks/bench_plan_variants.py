"""A tuned plan with a few modules moved to other settings: metric, paired difference and energy.

Each variant is the base plan with some modules at another gain and repeats; every variant is
evaluated on the same inputs with the same noise seeds as the base plan, so the differences are
paired (mean of the per-sample differences, one standard error). Energy: per single inference,
as ``abfp tune`` counts it, relative to the single-gain device.

    python3 benchmarks/bench_plan_variants.py --plan-from docs/results/tune/efficientnet-s14-oct2.json:gain \
        --variant "stem 22.6/2=_conv_stem.1:22.627:2" --on calibration --seeds 0,1 --out v.json

A plan of ``abfp tune --finetune`` runs with its finetuned weights: ``--plan-from P.json@W.safetensors``,
``--compare NAME=P.json@W.safetensors`` (each plan on its own copy of the model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plan_rows import load_plan, paired, setup  # noqa: E402

import copy  # noqa: E402

from abfp.energy import EnergyParams  # noqa: E402
from abfp.tune.provenance import load_weights  # noqa: E402
from abfp.tune import DevicePlan  # noqa: E402
from abfp.tune.api import _energy, _outputs, plan_outputs  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, tuple[float, int]]]:
    """``"NAME=MODULE:GAIN:REPEATS[,MODULE:GAIN:REPEATS...]"`` -> ``(NAME, {module: (gain, repeats)})``."""
    name, _, spec = text.partition("=")
    if not name or not spec:
        raise SystemExit(f"--variant {text!r}: expected NAME=MODULE:GAIN:REPEATS[,...]")
    moves = {}
    for part in spec.split(","):
        module, gain, reps = part.rsplit(":", 2)
        moves[module] = (float(gain), int(reps))
    return name, moves


def moved(plan: DevicePlan, moves: dict[str, tuple[float, int]]) -> DevicePlan:
    modules = dict(plan.modules)
    for m, (g, k) in moves.items():
        modules[m] = plan.config_for(m).replace(gain=g, repeats=k)
    return DevicePlan(plan.base, modules, plan.exclude)


def plan_and_model(spec: str, model):
    """``PLAN[@WEIGHTS.safetensors]`` -> the plan and the model it runs on (a copy with the weights loaded)."""
    plan_spec, _, weights = spec.partition("@")
    plan = load_plan(plan_spec)
    if not weights:
        return plan, model
    m = copy.deepcopy(model)
    load_weights(m, weights, plan.info)
    return plan, m.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="efficientnet-lite0")
    ap.add_argument("--plan-from", required=True, help="the base plan: RESULT.json:STAGE or a plan JSON")
    ap.add_argument("--compare", action="append", default=[], help="another whole plan, NAME=RESULT.json:STAGE")
    ap.add_argument("--variant", action="append", default=[], help="NAME=MODULE:GAIN:REPEATS[,...] (repeatable)")
    ap.add_argument("--on", choices=["eval", "calibration"], default="eval")
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--eval", type=int, default=312)
    ap.add_argument("--seeds", default="0", help="noise seeds, comma-separated")
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, cal, ev, metrics = setup(a.task, a.calibration, a.eval)
    data = ev if a.on == "eval" else cal
    ref = _outputs(model, data, a.batch_size)
    base, base_model = plan_and_model(a.plan_from, model)
    plans = {"base": (base, base_model)}
    for c in a.compare:
        name, _, spec = c.partition("=")
        plans[name] = plan_and_model(spec, model)
    for v in a.variant:
        name, moves = parse_variant(v)
        plans[name] = (moved(base, moves), base_model)
    e_inputs = tuple(t[:1] for t in cal.inputs)
    single = _energy(model, DevicePlan(base.base, {}, base.exclude), e_inputs, EnergyParams())
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        base_out = None
        for name, (plan, m_) in plans.items():
            out = plan_outputs(m_, plan, data, a.batch_size, seed)
            row = {"plan": name, "seed": seed, "on": a.on,
                   "energy_x": _energy(m_, plan, e_inputs, EnergyParams()) / single}
            for m in metrics:
                row[m.name] = m(out, data.targets, ref)
                row[m.name + "_se"] = m.stderr(out, data.targets, ref)
                if base_out is not None:
                    row[m.name + "_paired_vs_base"] = paired(m, base_out, out, ref)
            base_out = out if base_out is None else base_out
            rows.append(row)
            print(row, flush=True)
            with open(a.out, "w") as f:
                json.dump({"command": " ".join(sys.argv), "load": open("/proc/loadavg").read().split()[:3],
                           "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
