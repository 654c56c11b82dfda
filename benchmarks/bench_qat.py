"""QAT training step against a float32 training step of the same model (issue 17, item 2).

A step is forward, cross-entropy, backward and an AdamW update on one batch, in training
mode. The float32 model and the QAT model (converted as ``abfp.finetune.qat`` converts it:
the finetuning scenario's config without seed, so the noise keys come from torch's global
generator) are timed interleaved in one loop (fp32, QAT, fp32, QAT, ...), so machine load hits
both alike; the figure is the median of the per-round ratios QAT / float32.

    python3 benchmarks/bench_qat.py [--models fashion-cnn,fashion-vit] [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform

import torch
import torch.nn.functional as F

from abfp import ABFPConfig, zoo
from abfp.finetune.data import training_data
from abfp.nn import convert
from timing import ratio_row, time_interleaved  # benchmarks/timing.py

#: the issue's finetuning scenarios (docs/finetune.md): A for the CNN, C for the transformer
CONFIGS = {"fashion-cnn": ABFPConfig(noise_std=2.0), "fashion-vit": ABFPConfig(gain=1.0, noise_std=0.2887)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="fashion-cnn,fashion-vit")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    rows = []
    for name in args.models.split(","):
        task = zoo.get(name)
        data = training_data(name, 512)
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(data), generator=g)
        x = data.inputs[0][idx[:args.batch_size]]
        y = data.targets[idx[:args.batch_size]]
        base = task.build_model()
        cases = {"fp32": copy.deepcopy(base).float(), "qat": convert(base, CONFIGS[name], inplace=False).float()}
        steps = []
        for m in cases.values():
            m.train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

            def step(m=m, opt=opt) -> None:
                loss = F.cross_entropy(m(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            steps.append(step)
        times = time_interleaved(steps, args.repeats)
        row = ratio_row({"model": name, "threads": args.threads, "repeats": args.repeats, "batch": args.batch_size},
                        list(cases), times)
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
