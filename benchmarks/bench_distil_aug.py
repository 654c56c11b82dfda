"""Distil-QAT of EfficientNet-Lite0 on a tuned plan with a fresh batch of random calibration crops every step.

Session 10's distil-QAT drew its batches from the 338 fixed calibration crops and overfit them (training
loss fell, held-out KL rose). Here every step gets ``--batch-size`` new crops
(:func:`abfp.zoo.efficientnet.random_crops`: one of the 13 calibration photos, a square of 0.3-1.0 of its
shorter side at a random place, mirrored half the time, ``--jitter`` brightness/contrast), distilled (KL on
logits) against the frozen float32 model's logits on the same batch. The device is the plan of
``--plan-from RESULT.json:STAGE`` (noise from torch's global generator while training, as ``abfp.finetune.qat``);
batch norm and every other submodule stay in eval mode. ``--method dnf`` trains with differential noise instead
(the library's :class:`abfp.finetune.methods.DNFMethod`: histograms of the plan's ``dy`` measured once on
``--dnf-samples`` calibration crops, float32 plus noise drawn from them; the same fresh crops and loss).
``--dnf-per-channel`` fits one histogram per output channel instead of one per layer, ``--dnf-smoothing`` is
added to every bin's count (the authors' 0.5). ``--diagnose N`` trains
nothing: after the plan's row it evaluates the float32 model with the DNF noise (training mode, noise seeds
``0..N-1``) on the same evaluation crops (``--diagnose-crops M``: on M fresh random crops, the training
distribution, instead, with the plan's row on them too), the check that the noise model hurts as much as the device does.
``--baseline OTHER.json`` adds to every row the paired difference
(``after - before``, mean and standard error over the same crops) against that run's row at the same step, and
every row has it against this run's first row (``vs_start``). ``--init W.pt`` starts from saved weights (a ``--save`` of an earlier run; step numbers continue from
``--step-offset``; give another ``--seed`` for other crops; AdamW starts afresh). ``--train`` picks the trainable parameters:
``all``, ``sensitive`` (the stem convolution and block 0's depthwise convolution, the two layers that carry
72 % of the single-layer KL, with the batch norms after them) or ``no-bn`` (every weight but the batch norms' affine
parameters; their running statistics are frozen either way). AdamW at ``--lr``, one optimiser for the whole
run; ``--schedule cosine`` scales the rate of step ``s`` by :func:`abfp.finetune.loop.warmup_cosine` (``--warmup``
linear steps, then half a cosine to ~0 at step ``--schedule-steps``, by default the run's last step; counted from
step 0, so a run continued with ``--init``/``--step-offset`` continues the schedule). ``--temperature T``: the KL at
temperature T (times T^2, as :func:`abfp.finetune.distillation.kl_loss`). ``--feature-weight LAMBDA`` adds
LAMBDA times the library's feature loss (:class:`abfp.finetune.distillation.FeatureMatch`: the relative squared
error of the outputs of ``--feature-modules``, by default every MBConv block, against float32's on the same
crops). ``--ema D [D ...]`` also keeps an exponential moving average of the trained weights per decay D
(``e <- D e + (1 - D) w`` after every step, from the starting weights) and evaluates it at every row
(logits ``OUT.emaD.stepN.pt``; ``ema`` in the row, with its paired difference against the raw weights). With ``--save`` the weights are written
after every evaluated row, so a killed run can be continued from its last row. Every ``--every`` steps the model is evaluated on the plan (noise seed 0) on the 312 evaluation crops:
top-1 agreement and KL against float32, with standard errors (the float32 logits and the unfinetuned plan's
row are cached under ``--cache``; each row's logits go to ``OUT.stepN.pt``). Wall and process CPU time and the load average are in every row; the JSON
is rewritten after every row.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_distil_aug.py --plan-from docs/results/tune/efficientnet-I.json:gain \\
        --lr 1e-5 --batch-size 8 --steps 200 --every 50 --train all --out aug.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from abfp import zoo
from abfp.finetune.distillation import Distillation, FeatureMatch, feature_module_names
from abfp.finetune.loop import set_training, warmup_cosine
from abfp.finetune.methods import DNFMethod, DNFOptions, QATMethod
from abfp.nn import to_digital
from abfp.tune.api import plan_outputs
from abfp.zoo.base import AGREEMENT, KL, Dataset
from abfp.zoo.efficientnet import random_crops
from plan_rows import distil_update, load_plan, paired  # benchmarks/plan_rows.py

SENSITIVE = ("_conv_stem.", "_bn0.", "_blocks.0._depthwise_conv.", "_blocks.0._bn1.")


def trainable(name: str, module_kind: str, train: str) -> bool:
    """Whether parameter ``name`` (of a module of class ``module_kind``) is trained under ``--train``."""
    if train == "sensitive":
        return name.startswith(SENSITIVE)
    if train == "no-bn":
        return "BatchNorm" not in module_kind
    return True


def lr_at(step: int, a: argparse.Namespace) -> float:
    """The learning rate of step ``step`` (counted from 1, as the rows number them)."""
    if a.schedule == "constant":
        return a.lr
    return a.lr * warmup_cosine(step - 1, a.schedule_steps, a.warmup)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan-from", default="docs/results/tune/efficientnet-I.json:gain")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--method", choices=("qat", "dnf"), default="qat")
    ap.add_argument("--dnf-samples", type=int, default=128, help="dnf: calibration crops for the histograms")
    ap.add_argument("--dnf-per-channel", action="store_true", help="dnf: one histogram per output channel")
    ap.add_argument("--dnf-smoothing", type=float, default=0.5, help="dnf: added to every histogram bin's count")
    ap.add_argument("--diagnose", type=int, default=0, metavar="N",
                    help="dnf: no training; evaluate float32 + DNF noise with noise seeds 0..N-1, then stop")
    ap.add_argument("--diagnose-crops", type=int, default=0, metavar="M",
                    help="with --diagnose: M fresh random calibration crops (seed 10000 + --seed) instead of the evaluation crops")
    ap.add_argument("--init", default=None, help="start from these float32 weights (a state dict from --save)")
    ap.add_argument("--step-offset", type=int, default=0, help="number the steps from here (with --init)")
    ap.add_argument("--train", choices=("all", "sensitive", "no-bn"), default="all")
    ap.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    ap.add_argument("--warmup", type=int, default=0, help="cosine: linear warm-up steps")
    ap.add_argument("--schedule-steps", type=int, default=None,
                    help="cosine: the schedule's length (default: --step-offset + --steps)")
    ap.add_argument("--temperature", type=float, default=1.0, help="the KL's softmax temperature")
    ap.add_argument("--feature-weight", type=float, default=0.0, help="feature distillation's lambda (0: none)")
    ap.add_argument("--feature-modules", default=None, help="regex over module names (default: every MBConv block)")
    ap.add_argument("--ema", type=float, nargs="*", default=[], metavar="D", help="also evaluate EMAs of the weights")
    ap.add_argument("--jitter", type=float, default=0.0)
    ap.add_argument("--min-scale", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=312, help="the first EVAL evaluation crops (312: all)")
    ap.add_argument("--eval-batch-size", type=int, default=24)
    ap.add_argument("--cache", default="/tmp/effnet-aug-cache")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", default=None, help="write the finetuned float32 weights (state dict) here after every row")
    ap.add_argument("--baseline", default=None, metavar="OTHER.json",
                    help="another run's --out: each row also gets the paired difference against its row at the same step")
    a = ap.parse_args()
    if a.diagnose and a.method != "dnf":
        ap.error("--diagnose needs --method dnf")
    if a.diagnose_crops and not a.diagnose:
        ap.error("--diagnose-crops needs --diagnose")
    if a.schedule_steps is None:
        a.schedule_steps = a.step_offset + a.steps
    if a.schedule == "cosine" and not 0 <= a.warmup < a.schedule_steps:
        ap.error("--warmup must be >= 0 and below the schedule's steps")
    if a.schedule == "cosine" and a.schedule_steps < a.step_offset + a.steps:
        ap.error("--schedule-steps must reach the run's last step (--step-offset + --steps)")
    if not a.temperature > 0:
        ap.error("--temperature must be > 0")
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    task = zoo.get("efficientnet-lite0")
    model = task.build_model().eval()
    if a.init:
        model.load_state_dict(torch.load(a.init))
    teacher = task.build_model().eval()
    plan = load_plan(a.plan_from)
    if a.diagnose_crops:
        gen_ev = torch.Generator().manual_seed(10_000 + a.seed)
        ev = Dataset(random_crops(a.diagnose_crops, gen_ev, min_scale=a.min_scale, jitter=a.jitter))
        tag = f"crops{a.seed}-{a.min_scale}-{a.jitter}-"
    else:
        ev, tag = task.load_data().take(a.eval), ""
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    ref_path = cache / f"ref-{tag}{len(ev)}.pt"
    if ref_path.exists():
        ref = torch.load(ref_path)
    else:
        with torch.no_grad():
            ref = torch.cat([teacher(x) for (x,), _ in ev.batches(a.eval_batch_size)])
        torch.save(ref, ref_path)
    rows: list[dict] = []

    def write() -> None:
        with open(a.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "args": vars(a), "rows": rows}, f, indent=1)

    def scored(out: torch.Tensor) -> dict:
        return {"agreement": AGREEMENT(out, None, ref), "agreement_se": AGREEMENT.stderr(out, None, ref),
                "kl": KL(out, None, ref), "kl_se": KL.stderr(out, None, ref)}

    def record(step: int, m: torch.nn.Module | None, extra: dict) -> None:
        """``m``: the model being trained (converted); ``None``: the starting weights (cached unless ``--init``)."""
        key = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        plan_path = None if a.init else cache / f"plan-{key}-{tag}{len(ev)}.pt"
        if m is None and plan_path is not None and plan_path.exists():
            out = torch.load(plan_path)
        else:
            digital = model if m is None else to_digital(m, inplace=False)
            out = plan_outputs(digital, plan, ev, a.eval_batch_size, 0)
            if m is None and plan_path is not None:
                torch.save(out, plan_path)
        torch.save(out, f"{a.out}.step{step}.pt")  # the logits, for paired comparisons between rows
        versus = {}
        for what, path in (("vs_start", f"{a.out}.step{a.step_offset}.pt"),
                           ("vs_baseline", a.baseline and f"{a.baseline}.step{step}.pt")):
            if m is not None and path and Path(path).exists():
                before = torch.load(path)
                versus[what] = {"kl": paired(KL, before, out, ref), "agreement": paired(AGREEMENT, before, out, ref)}
        rows.append({"step": step, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                     "load": os.getloadavg()[0], **extra, **scored(out), **versus})
        print(rows[-1], flush=True)
        write()

    record(a.step_offset, None, {})
    if a.method == "qat":  # the device in the forward, noise from torch's global generator
        method = QATMethod(plan.base, plan.overrides())
    else:  # float32 plus noise from histograms of the plan's dy on --dnf-samples calibration crops
        method = DNFMethod(plan.base, DNFOptions(calibration_samples=a.dnf_samples, per_channel=a.dnf_per_channel,
                                                      smoothing=a.dnf_smoothing), plan.overrides())
    net = method.prepare(model, task.load_calibration(), a.seed, (), None)
    if a.diagnose:  # float32 + the histograms' noise (training mode draws it), no weight changes
        set_training(net, frozen=True)
        for noise_seed in range(a.diagnose):
            torch.manual_seed(noise_seed)
            with torch.no_grad():
                out = torch.cat([net(x) for (x,), _ in ev.batches(a.eval_batch_size)])
            torch.save(out, f"{a.out}.noise{noise_seed}.pt")
            rows.append({"step": a.step_offset, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                         "load": os.getloadavg()[0], "method": "dnf-noise", "per_channel": a.dnf_per_channel,
                         "noise_seed": noise_seed, "histogram_seconds": method.histogram_seconds, **scored(out)})
            print(rows[-1], flush=True)
            write()
        method.finish()
        return
    params = []
    kinds = {name: type(m).__name__ for name, m in net.named_modules()}
    for name, p in net.named_parameters():
        p.requires_grad_(trainable(name, kinds[name.rpartition(".")[0]], a.train))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    set_training(net, frozen=True)
    features = None
    if a.feature_weight:
        dist = Distillation("kl", a.temperature, a.feature_weight, a.feature_modules)
        features = FeatureMatch(net, teacher, feature_module_names(teacher, a.feature_modules), dist)
    trained = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    emas = {d: [p.detach().clone() for _, p in trained] for d in a.ema}

    def record_ema(step: int) -> None:
        raw = torch.load(f"{a.out}.step{step}.pt")
        for d, values in emas.items():
            digital = to_digital(net, inplace=False)
            with torch.no_grad():
                for (n, _), v in zip(trained, values):
                    digital.get_parameter(n).copy_(v)
            out = plan_outputs(digital, plan, ev, a.eval_batch_size, 0)
            torch.save(out, f"{a.out}.ema{d}.step{step}.pt")
            rows[-1].setdefault("ema", {})[str(d)] = {**scored(out), "vs_raw": {
                "kl": paired(KL, raw, out, ref), "agreement": paired(AGREEMENT, raw, out, ref)}}
            print("ema", d, rows[-1]["ema"][str(d)], flush=True)
            write()

    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    losses: list[float] = []
    for step in range(a.step_offset + 1, a.step_offset + a.steps + 1):
        x = random_crops(a.batch_size, gen, min_scale=a.min_scale, jitter=a.jitter)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a)
        losses.append(distil_update(net, teacher, opt, x, a.temperature, features))
        with torch.no_grad():
            for d, values in emas.items():
                for v, (_, p) in zip(values, trained):
                    v.mul_(d).add_(p.detach(), alpha=1.0 - d)
        if step % a.every == 0 or step == a.step_offset + a.steps:
            recent = losses[-a.every:]
            net.eval()
            record(step, net, {"method": a.method, "train_loss": sum(recent) / len(recent),
                               "n_params": sum(p.numel() for p in params), "lr": lr_at(step, a),
                               "feature_weight": a.feature_weight})
            record_ema(step)
            if a.save:  # after every row: a killed run continues from here (--init, --step-offset)
                torch.save(to_digital(net, inplace=False).state_dict(), a.save)
            set_training(net, frozen=True)
    method.finish()


if __name__ == "__main__":
    main()
