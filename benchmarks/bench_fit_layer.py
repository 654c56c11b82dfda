"""Layer-wise weight fitting of one module (an experiment beside bias correction): the module's
weights are fitted so that its device output (the plan's config, noise included, straight-through
gradients) on calibration inputs matches the float32 module's output on the same float32 inputs
(local MSE, Adam), every other module untouched; then the plan is evaluated on the held-out inputs.

    python3 benchmarks/bench_fit_layer.py --plan-from docs/results/tune/efficientnet-I.json:gain \
        --module _conv_stem --steps 100 --lr 1e-3 --out fit.json
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import abfp
from abfp.finetune.layerwise import spread
from plan_rows import Rows, load_plan, setup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="efficientnet-lite0")
    ap.add_argument("--plan-from", required=True)
    ap.add_argument("--module", required=True, help="the module fitted (its inputs are the model's inputs: the first)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval", type=int, default=312)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, cal, ev, metrics = setup(a.task, 338, a.eval)
    plan = load_plan(a.plan_from)
    rows = Rows(a.out, model, ev, metrics, a.batch_size)
    c0, w0 = time.process_time(), time.perf_counter()
    x = cal.inputs[0][spread(len(cal), a.samples)]
    teacher = dict(model.named_modules())[a.module]
    student = copy.deepcopy(teacher).train()
    cfg = plan.config_for(a.module + ".1") if a.module + ".1" in plan.modules else plan.config_for(a.module)
    dev = abfp.convert(student, cfg.replace(seed=None), inplace=True)  # trains the student's own parameters
    with torch.no_grad():
        target = teacher(x)
    def full_mse() -> float:
        with torch.no_grad():
            return sum(float(torch.nn.functional.mse_loss(dev(x[i:i + 32]), target[i:i + 32])) * len(x[i:i + 32])
                       for i in range(0, len(x), 32)) / len(x)

    mse_before = full_mse()
    print(f"local mse on all {len(x)} samples before: {mse_before:.4g}", flush=True)
    opt = torch.optim.Adam([p for p in student.parameters()], lr=a.lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(a.steps):
        idx = torch.randint(0, len(x), (a.batch,), generator=g)
        loss = torch.nn.functional.mse_loss(dev(x[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == a.steps - 1:
            print(f"step {step}: local mse {losses[-1]:.4g} ({time.process_time() - c0:.0f} s CPU)", flush=True)
    mse_after = full_mse()
    print(f"local mse on all {len(x)} samples after: {mse_after:.4g}", flush=True)
    abfp.to_digital(dev)
    fitted = copy.deepcopy(model)
    dict(fitted.named_modules())[a.module].load_state_dict(student.state_dict())
    rows.evaluate(f"fit {a.module}", fitted.eval(), plan, steps=a.steps, lr=a.lr, samples=a.samples,
                  fit_cpu=time.process_time() - c0, fit_wall=time.perf_counter() - w0,
                  mse_before=mse_before, mse_after=mse_after, config=cfg.label())


if __name__ == "__main__":
    main()
