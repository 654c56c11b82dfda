"""How hard is a fidelity target? The task's metric for common number formats, beside abfp's DACs.

A fidelity goal (top-1 agreement with float32, KL, cosine) depends as much on the inputs as on the
device: where float32's top two classes are close, any rounding flips some answers. This script
puts a task's target in context by scoring, on the task's evaluation inputs, formats everyone
knows, none of them simulated by abfp:

* ``bfloat16`` / ``float16``: the whole model cast (weights and activations), as autocast-free
  inference in that dtype; bfloat16 keeps 8 significant bits, like an 8-bit DAC with a per-value
  exponent;
* ``int8 PTQ``: the textbook post-training quantisation, every ``Conv*d`` / ``Linear`` input and
  weight rounded to ``round(clamp(v / s, -127, 127)) * s``, weights with one scale per output
  channel (``s = max|W_o| / 127``), inputs with one static scale per layer (``s = max|X| / 127``
  over the calibration inputs, or the first evaluation batch when the task has none);

and abfp's own device with only its DACs (``--bits`` input and weight bits, 24-bit ADC, gain 1, no
noise) at tile widths 128 and 8. Each row gives the task's metric with its standard error and the
task's extra metrics. Also printed: how confident float32 is (median top-1 probability, share of
inputs whose top-two margin is under 0.05) for classifiers.

    python3 benchmarks/bench_reference_formats.py --task efficientnet-lite0 [--samples N] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import Tensor, nn

import abfp
from abfp import zoo
from abfp.allocator import keep_freed_memory

QUANTISED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def outputs(model: nn.Module, data: zoo.Dataset, batch: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The model's outputs on every batch, inputs cast to ``dtype`` where floating, outputs float32."""
    with torch.no_grad():
        parts = []
        for inputs, _ in data.batches(batch):
            cast = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
            parts.append(model(*cast).float())
    return torch.cat(parts)


def round_to(v: Tensor, scale: Tensor | float, levels: int) -> Tensor:
    """``round(clamp(v / s, -L, L)) * s``: symmetric uniform rounding to ``2 L + 1`` levels."""
    return (v / scale).round().clamp(-levels, levels) * scale


def int_ptq(model: nn.Module, calibration: zoo.Dataset, batch: int, bits: int) -> nn.Module:
    """A copy of ``model`` with per-channel weights and per-layer static input scales (module doc)."""
    levels = 2 ** (bits - 1) - 1
    q = copy.deepcopy(model)
    layers = [m for m in q.modules() if isinstance(m, QUANTISED)]
    peak: dict[nn.Module, float] = {}

    def record(module: nn.Module, args: tuple) -> None:
        peak[module] = max(peak.get(module, 0.0), float(args[0].detach().abs().max()))

    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        outputs(q, calibration, batch)
    finally:
        for h in handles:
            h.remove()
    for m in layers:
        w = m.weight.data
        s = w.abs().flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny) / levels
        m.weight.data = round_to(w, s.view(-1, *([1] * (w.dim() - 1))), levels)
        s_in = max(peak[m], torch.finfo(torch.float32).tiny) / levels
        m.register_forward_pre_hook(lambda _m, args, s_in=s_in: (round_to(args[0], s_in, levels), *args[1:]))
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="efficientnet-lite0")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bits", type=int, default=8, help="integer / DAC bits")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    task = zoo.get(args.task)
    metrics = [task.metric, *zoo.extra_metrics(task.name)]
    model = task.build_model().float().eval()
    data = task.load_data().take(args.samples)
    calibration = task.load_calibration() if task.load_calibration else data.take(args.batch_size)
    reference = outputs(model, data, args.batch_size)
    rows = []

    def row(name: str, out: Tensor) -> None:
        values = {m.name: (m(out, data.targets, reference), m.stderr(out, data.targets, reference)) for m in metrics}
        rows.append({"format": name, **{k: {"value": v, "stderr": e} for k, (v, e) in values.items()}})
        text = "  ".join(f"{k} {v:.4g}" + (f" +- {e:.2g}" if e is not None else "") for k, (v, e) in values.items())
        print(f"{name:48s} {text}", flush=True)

    if reference.dim() == 2 and task.metric.name == zoo.AGREEMENT.name:
        p = reference.softmax(-1).topk(2, -1).values
        print(f"float32: median top-1 probability {p[:, 0].median():.3f}, "
              f"top-two margin < 0.05 on {((p[:, 0] - p[:, 1]) < 0.05).float().mean() * 100:.0f} % of inputs")  # fmt: skip
    for dtype in (torch.bfloat16, torch.float16):
        row(str(dtype).removeprefix("torch."), outputs(copy.deepcopy(model).to(dtype), data, args.batch_size, dtype))
    row(f"int{args.bits} PTQ (per-channel W, per-layer static X)",
        outputs(int_ptq(model, calibration, args.batch_size, args.bits), data, args.batch_size))  # fmt: skip
    for n in (128, 8):
        cfg = abfp.ABFPConfig(tile_width=n, input_bits=args.bits, weight_bits=args.bits, output_bits=24, gain=1.0,
                              noise_std=0.0)  # fmt: skip
        row(f"abfp n={n} DACs only ({args.bits}/{args.bits}, ideal ADC)",
            outputs(abfp.convert(copy.deepcopy(model), cfg), data, args.batch_size))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"task": task.name, "samples": len(data), "bits": args.bits, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
