"""A converted model in eager mode against the same model under ``torch.compile`` and the
float32 model (issue 17, item 1).

Each case is one inference forward (``torch.no_grad``) on one batch; the three are timed
interleaved in one loop (fp32, eager, compiled, fp32, ...), so machine load hits them alike;
the figures are medians of the per-round ratios against float32. The compiled model is
``torch.compile(converted_model)`` (inductor; every product one ``abfp::device`` or
``abfp::conv2d`` node, the digital work between them compiled); its output is compared with
eager's (noise-free config): equal when inductor rounds the digital float32 work as eager does
(the CNN), else an ADC sample near a code boundary may round the other way (the ViT's layer
norm and softmax: ``max_abs_diff``).

    python3 benchmarks/bench_compile.py [--models fashion-cnn,fashion-vit] [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import json
import time

import torch

from abfp import ABFPConfig, zoo
from abfp.nn import convert
from timing import model_bench_args, ratio_row, time_interleaved, write_rows  # benchmarks/timing.py


def main() -> None:
    args = model_bench_args(__doc__)
    rows = []
    for name in args.models.split(","):
        task = zoo.get(name)
        x = task.load_data().inputs[0][: args.batch_size]
        fp32 = task.build_model().eval()
        eager = convert(task.build_model().eval(), ABFPConfig(noise_std=0.0))
        t0 = time.perf_counter()
        compiled = torch.compile(eager)
        with torch.no_grad():
            yc, ye = compiled(x), eager(x)
        compile_s = time.perf_counter() - t0
        cases = {"fp32": fp32, "eager": eager, "compiled": compiled}

        def run(m) -> None:
            with torch.no_grad():
                m(x)

        times = time_interleaved([lambda m=m: run(m) for m in cases.values()], args.repeats)
        row = {"model": name, "threads": args.threads, "repeats": args.repeats, "batch": args.batch_size,
               "compiled_equals_eager": torch.equal(yc, ye), "max_abs_diff": float((yc - ye).abs().max()),
               "first_compile_s": round(compile_s, 1)}
        rows.append(ratio_row(row, list(cases), times))
        print(json.dumps(row))
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
