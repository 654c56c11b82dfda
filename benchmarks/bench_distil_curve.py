"""Distil-QAT on EfficientNet-Lite0's error-rule plan, measured on held-out crops as it trains.

Gains: the error rule on the first ``--gain-samples`` calibration crops, or ``--plan-from RESULT.json:STAGE``
(a ``bench_tune.py`` result: that stage's plan, e.g. the energy rule's); then ``--chunks`` runs of
``--chunk`` distil-QAT steps (KL on logits from the frozen float32 model, AdamW, ``--lr``,
batches of ``--batch-size`` of the ``--calibration`` calibration crops; each chunk continues from
the last one's weights with a fresh optimiser, seed = chunk index), each followed by the top-1
agreement and KL (± standard error) on the first ``--eval`` evaluation crops (other photos). Wall
and process CPU time since the start are in every row; JSON after every row. After every chunk its
weights go to ``OUT.chunkN.pt``; ``--resume`` continues from the last one (a killed run loses at most
the chunk it was in; CPU and wall time then count from the resumed start, ``resumed_at`` says where).

    python3 benchmarks/bench_distil_curve.py --lr 5e-5 --batch-size 16 --chunk 100 --chunks 4 --out curve.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from abfp import ABFPConfig, zoo
from abfp.energy import EnergyParams
from abfp.finetune.distillation import Distillation, as_inputs
from abfp.finetune.methods import qat
from abfp.tune import DevicePlan, choose_gains
from abfp.tune.api import _energy, _outputs, _product_modules, plan_outputs
from abfp.tune.cli import split_data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="efficientnet-lite0")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--calibration", type=int, default=338)
    ap.add_argument("--eval", type=int, default=312)
    ap.add_argument("--gain-samples", type=int, default=16)
    ap.add_argument("--eval-batch-size", type=int, default=24)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plan-from", default=None, help="RESULT.json:STAGE, a bench_tune.py result's stage plan")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    task = zoo.get(a.task)
    model = task.build_model().eval()
    cal, ev, _ = split_data(task, a.calibration, a.eval)
    metrics = [task.metric, *zoo.extra_metrics(a.task)]
    cfg = ABFPConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    e_in = tuple(t[:4] for t in cal.inputs)
    if a.plan_from:
        path, stage = a.plan_from.rsplit(":", 1)
        found = [r["plan"] for r in json.load(open(path))["rows"] if r["stage"] == stage]
        if not found:
            raise SystemExit(f"no stage {stage!r} in {path}")
        plan = DevicePlan.from_dict(found[0])
    else:
        gains = choose_gains(model, tuple(t[:a.gain_samples] for t in cal.inputs), cfg)
        mods = _product_modules(model, DevicePlan(cfg), e_in)
        plan = DevicePlan(cfg, {m: cfg.replace(gain=gains.get(m, cfg.gain)) for m in mods})
    ref = _outputs(model, ev, a.eval_batch_size)
    rows: list[dict] = []
    done = 0
    if a.resume and Path(a.out).exists():
        rows = json.load(open(a.out))["rows"]
        done = sum(r["stage"].startswith("qat") for r in rows)
        if done:
            model.load_state_dict(torch.load(f"{a.out}.chunk{done}.pt"))
        rows.append({"stage": "resumed_at", "chunks": done})

    def evaluate(name: str, m: torch.nn.Module) -> None:
        out = plan_outputs(m, plan, ev, a.eval_batch_size, 0)
        rows.append({"stage": name, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                     **{x.name: x(out, ev.targets, ref) for x in metrics},
                     **{x.name + "_se": x.stderr(out, ev.targets, ref) for x in metrics}})
        print(rows[-1], flush=True)
        with open(a.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows, "plan": plan.to_dict(),
                       "energy_pj": _energy(model, plan, e_in, EnergyParams())}, f, indent=1)

    if not rows:
        evaluate("plan", model)
    m = model
    for c in range(done, a.chunks):
        res = qat(m, as_inputs(cal.inputs), plan.base, steps=a.chunk, lr=a.lr, batch_size=a.batch_size,
                  loss=Distillation("kl", 1.0), overrides=plan.overrides(), seed=c, progress=False, timing_steps=0,
                  timing_every=0)
        m = res.model.eval()
        torch.save(m.state_dict(), f"{a.out}.chunk{c + 1}.pt")
        print("mean loss of the chunk", sum(res.losses) / len(res.losses), flush=True)
        evaluate(f"qat {(c + 1) * a.chunk} steps", m)


if __name__ == "__main__":
    main()
