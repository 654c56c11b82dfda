"""CPU time of one distil-QAT step of EfficientNet-Lite0 on a tuned plan, per batch size, against float32.

A step is what ``abfp tune --finetune distil-qat`` does per step: ``--batch-sizes`` fresh random crops of
the calibration photos (:func:`abfp.zoo.efficientnet.random_crops`), the frozen float32 teacher's logits on
them, the student's logits through the plan's devices (:class:`abfp.finetune.methods.QATMethod`: every
module at its own gain and repeats, noise on, straight-through gradients), KL, backward and an AdamW
update; batch norm in eval mode. The float32 case is the same step of an unconverted copy. All cases run
interleaved (:func:`timing.time_interleaved`: 3 warm-up rounds, then ``--repeats`` rounds), process CPU
time; each row gives the median and its ratio to float32 at the same batch size (median of the per-round
ratios) and per crop.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_distil_step.py --batch-sizes 8,32 --repeats 3 --threads 1 \\
        --json step.json
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch

from abfp import zoo
from abfp.finetune.loop import set_training
from abfp.finetune.methods import QATMethod
from abfp.zoo.efficientnet import random_crops
from plan_rows import distil_update, load_plan  # benchmarks/plan_rows.py
from timing import bench_args, time_interleaved, write_rows  # benchmarks/timing.py


def distil_step(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor):
    set_training(student, frozen=True)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)

    return lambda: distil_update(student, teacher, opt, x)


def main() -> None:
    def extra(ap) -> None:
        ap.add_argument("--plan-from", default="docs/results/tune/efficientnet-I.json:gain")
        ap.add_argument("--batch-sizes", default="8,32")

    a = bench_args(__doc__, repeats=3, threads=1, extra=extra)
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    task = zoo.get("efficientnet-lite0")
    teacher = task.build_model().eval()
    plan = load_plan(a.plan_from)
    gen = torch.Generator().manual_seed(0)
    cases, fns = [], []
    for b in sizes:
        x = random_crops(b, gen)
        fp32 = copy.deepcopy(teacher)
        device = QATMethod(plan.base, plan.overrides()).prepare(copy.deepcopy(teacher), task.load_calibration(), 0,
                                                                (), None)
        cases += [("float32", b), ("distil-qat", b)]
        fns += [distil_step(fp32, teacher, x), distil_step(device, teacher, x)]
    torch.manual_seed(0)
    c0 = time.process_time()
    times = time_interleaved(fns, a.repeats, clock=time.process_time)
    rows = []
    for i in range(0, len(cases), 2):
        (_, b), f32, qat = cases[i], times[i], times[i + 1]
        q = statistics.median(qat)
        rows.append({"batch_size": b, "float32_s": statistics.median(f32), "distil_qat_s": q,
                     "distil_qat_s_per_crop": q / b,
                     "ratio_to_float32": statistics.median(y / x for x, y in zip(f32, qat)),
                     "distil_qat_all_s": qat, "float32_all_s": f32})
    for r in rows:
        r["ratio_to_smallest_batch"] = r["distil_qat_s"] / rows[0]["distil_qat_s"]
        print({k: v for k, v in r.items() if not k.endswith("all_s")}, flush=True)
    meta = {"command": "bench_distil_step.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                                                          if v is not None),
            "load_average": os.getloadavg(), "cpu_total_s": time.process_time() - c0}
    print(meta)
    write_rows(a.json, [meta, *rows])


if __name__ == "__main__":
    main()
