"""QAT training step against a float32 training step of the same model (issue 17, item 2).

A step is forward, cross-entropy, backward and an AdamW update on one batch, in training
mode. The float32 model and the QAT model (converted as ``abfp.finetune.qat`` converts it:
the finetuning scenario's config without seed, so the noise keys come from torch's global
generator) are timed interleaved in one loop (fp32, QAT, fp32, QAT, ...), so machine load hits
both alike; the figure is the median of the per-round ratios QAT / float32.

    python3 benchmarks/bench_qat.py [--models fashion-cnn,fashion-vit] [--repeats 20] [--threads 1] [--rows] [--reference-dx]

``--rows`` adds a third case, ``qat_rows``: the same QAT model with its convolutions on the row
path (``abfp.ops.conv.TRAIN_IN_COLUMNS = False``: im2col through autograd, the reference of the
column training path), so that the gain of the column path is measured in the same loop.
``--reference-dx`` adds ``qat_ref_dx``: the column path with the convolutions' reference input
gradient (``abfp.ops.conv.TORCH_INPUT_GRAD = False``: GEMMs + col2im instead of torch's
convolution input gradient).
"""

from __future__ import annotations

import copy
import json


import abfp.ops.conv as conv_family
from abfp import ABFPConfig, zoo
from abfp.nn import convert
from timing import model_bench_args, ratio_row, time_interleaved, training_batch, training_step, write_rows  # benchmarks/timing.py

#: the issue's finetuning scenarios (docs/finetune.md): A for the CNN, C for the transformer
CONFIGS = {"fashion-cnn": ABFPConfig(noise_std=2.0), "fashion-vit": ABFPConfig(gain=1.0, noise_std=0.2887)}


def switched(step, flag: str):
    """``step`` with the switch ``abfp.ops.conv.<flag>`` (``TRAIN_IN_COLUMNS``: the row path;
    ``TORCH_INPUT_GRAD``: the reference input gradient) off."""

    def run() -> None:
        setattr(conv_family, flag, False)
        try:
            step()
        finally:
            setattr(conv_family, flag, True)

    return run


def main() -> None:
    args = model_bench_args(__doc__, lambda ap: (ap.add_argument("--rows", action="store_true"),
                                                 ap.add_argument("--reference-dx", action="store_true")))
    rows = []
    for name in args.models.split(","):
        x, y, _ = training_batch(name, args.batch_size)
        base = zoo.get(name).build_model()
        cases = {"fp32": copy.deepcopy(base).float(), "qat": convert(base, CONFIGS[name], inplace=False).float()}
        steps = [training_step(m, x, y) for m in cases.values()]
        if args.rows:
            cases["qat_rows"] = convert(base, CONFIGS[name], inplace=False).float()
            steps.append(switched(training_step(cases["qat_rows"], x, y), "TRAIN_IN_COLUMNS"))
        if args.reference_dx:
            cases["qat_ref_dx"] = convert(base, CONFIGS[name], inplace=False).float()
            steps.append(switched(training_step(cases["qat_ref_dx"], x, y), "TORCH_INPUT_GRAD"))
        times = time_interleaved(steps, args.repeats)
        row = ratio_row({"model": name, "threads": args.threads, "repeats": args.repeats, "batch": args.batch_size},
                        list(cases), times)
        rows.append(row)
        print(json.dumps(row))
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
