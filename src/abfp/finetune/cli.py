"""``abfp finetune``: recover a model's accuracy on a device with DNF (default) or QAT.

    abfp finetune                                   DNF, the default scenario (see DEFAULTS)
    abfp finetune --method qat --json qat.json      QAT on the same scenario
    abfp finetune --model fashion-vit --steps 300 --per-channel
    abfp finetune --task efficientnet-lite0 --loss kl --noise 0.2887   label-free: distil from float32
    abfp finetune --resume                          continue a killed run from its last checkpoint
    abfp finetune --force                           start again over an existing checkpoint / outputs
    torchrun --nproc-per-node 2 -m abfp finetune    the same on two processes (data parallel)
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path
from typing import Any

from ..cli_common import UsageError, check_output_args, note_fewer, refuse_inapplicable, single_task
from ..cli_common import base_config as _base_config
from ..config import ABFPConfig

#: The default scenario: a device that costs fashion-cnn a clear loss: the authors' n = 128,
#: G = 8, 8/8/8, but device noise of 2 LSB (std) instead of 0.29 costs ~9.5 points of top-1
#: on the first 2000 test images (93.6 -> 84.1); see docs/finetune.md.
DEFAULTS: dict[str, Any] = {
    "model": "fashion-cnn",
    "tile_width": 128,
    "gain": 8.0,
    "noise_std": 2.0,
    "steps": 200,
    "lr": 3e-4,
    "batch_size": 64,
    "eval_samples": 2000,
}


#: ``--validation-samples``' default: a fifth of the training inputs, at most this many.
VALIDATION_MAX = 1000
#: ``--validate-every``'s default.
VALIDATE_EVERY = 25

#: Zoo tasks without labels that finetune label-free on their calibration split.
UNLABELLED_TASKS = ("efficientnet-lite0", "minilm-l6")
#: Their default distillation loss.
DEFAULT_LOSS = {"efficientnet-lite0": "kl", "minilm-l6": "cosine"}


def is_user_task(name: str) -> bool:
    """``package.module:function`` or ``path.py:function`` (:func:`abfp.zoo.get`)."""
    return ":" in name


def resolve_loss(args: argparse.Namespace) -> str | None:
    """``--loss``, or its default: ce for a labelled zoo task, the task's distillation loss
    otherwise; ``None`` for a user task's default (its metric's: :func:`user_task_loss`)."""
    if args.loss is None:
        return None if is_user_task(args.model) else DEFAULT_LOSS.get(args.model, "ce")
    if args.loss == "ce" and args.model in UNLABELLED_TASKS:
        raise UsageError(f"--model {args.model} has no labels: use --loss kl, cosine or mse (label-free)")
    return args.loss


def add_feature_arguments(group: Any, prefix: str, default: float | None) -> None:
    """``--{prefix}feature-weight LAMBDA`` (default ``default``) and ``--{prefix}feature-modules REGEX``:
    feature distillation (:class:`~.distillation.Distillation`), for ``abfp finetune`` and ``abfp tune``."""
    group.add_argument(f"--{prefix}feature-weight", type=float, default=default, metavar="LAMBDA",
                       help="label-free distillation: feature distillation, the loss plus LAMBDA * sum_l "
                            "mean((s_l - t_l)^2) / mean(t_l^2) over the outputs of the model's blocks (its nn.ModuleList "
                            f"entries, or --{prefix}feature-modules) against float32's (default 0: the output loss alone)")
    group.add_argument(f"--{prefix}feature-modules", default=None, metavar="REGEX",
                       help=f"with --{prefix}feature-weight: the modules whose outputs are matched, a regular expression "
                            "over module names matched in full (default: every nn.ModuleList entry)")


def register(sub: Any) -> None:
    """Add the ``finetune`` subcommand to ``abfp``'s subparsers."""
    p = sub.add_parser(
        "finetune", help="finetune a zoo model for a device with DNF or QAT",
        description="Finetune a zoo model so that it keeps its accuracy on the ABFP device: differential noise "
                    "finetuning (DNF: float32 training with noise drawn from histograms of the device's error) or "
                    "quantisation-aware training (QAT: training through the simulator). Evaluation before and "
                    "after is always on the full device simulation. See docs/finetune.md.")
    p.add_argument("--method", choices=["dnf", "qat"], default="dnf", help="default: dnf")
    p.add_argument("--model", "--task", dest="model", default=DEFAULTS["model"],
                   help="zoo task: fashion-cnn (default) or fashion-vit (labelled training set); efficientnet-lite0 "
                        "or minilm-l6 (label-free, on their calibration split); or a user task, package.module:function "
                        "or path.py:function (label-free by default, on its calibration split if it has one, else on "
                        "the first --train-samples of its data, evaluated on the rest)")
    p.add_argument("--loss", choices=["ce", "kl", "cosine", "mse"], default=None,
                   help="ce: cross entropy on the labels; kl (logits), cosine or mse (outputs): label-free distillation "
                        "from a frozen float32 copy of the model (default: ce with labels, else the task's: kl for "
                        "efficientnet-lite0, cosine for minilm-l6; a user task: kl for a percentage or KL metric, "
                        "else cosine)")
    p.add_argument("--temperature", type=float, default=None, help="temperature T of --loss kl (default 1)")
    add_feature_arguments(p, "", 0.0)
    g = p.add_argument_group("device (default: n=128, gain 8, 8/8/8, uniform noise of std 2 LSB)")
    g.add_argument("--preset", default=None, help="named device config (abfp presets); replaces the default scenario")
    g.add_argument("--config", default=None, help="device config as a JSON file or string; replaces the default scenario")
    g.add_argument("--tile-width", type=int, default=None, help=f"tile width n (default {DEFAULTS['tile_width']})")
    g.add_argument("--gain", type=float, default=None, help=f"gain G (default {DEFAULTS['gain']:g})")
    g.add_argument("--noise", type=float, default=None,
                   help=f"device noise std in ADC LSBs (default {DEFAULTS['noise_std']:g}; the authors' reference is 0.2887)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=DEFAULTS["steps"], help=f"training steps (default {DEFAULTS['steps']})")
    t.add_argument("--lr", type=float, default=DEFAULTS["lr"], help=f"AdamW learning rate (default {DEFAULTS['lr']:g})")
    t.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help=f"default {DEFAULTS['batch_size']}")
    t.add_argument("--seed", type=int, default=0, help="data order, dropout, noise; also the device seed of the "
                   "evaluation unless the device config sets one (default 0)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--lr-decay", type=float, default=1.0, help="learning rate factor per epoch of the training set (default 1)")
    t.add_argument("--train-samples", type=int, default=None, help="use the first N training inputs (default all; a user task without a calibration split: "
                        "half of its data)")
    t.add_argument("--eval-samples", type=int, default=DEFAULTS["eval_samples"], help=f"first N test / evaluation inputs for the metrics (default {DEFAULTS['eval_samples']})")
    t.add_argument("--eval-batch-size", type=int, default=500, help="default 500")
    t.add_argument("--validation-samples", type=int, default=None, metavar="N",
                   help="hold out the last N training inputs (never trained on, never the evaluation inputs); the run's "
                        "loss on them is measured on the device before the first step and every --validate-every steps, "
                        "and the weights of the lowest are kept and evaluated, so that a run that over-fits or diverges "
                        "ends no worse than it began on held-out inputs (default: a fifth of the training inputs, at most "
                        f"{VALIDATION_MAX}; 0: keep the last step's weights)")
    t.add_argument("--validate-every", type=int, default=None, metavar="K",
                   help=f"steps between validations (default {VALIDATE_EVERY})")
    d = p.add_argument_group("DNF variants (the defaults are the authors' method)")
    d.add_argument("--calibration-samples", type=int, default=128, help="size of the one calibration batch (default 128)")
    d.add_argument("--bins", type=int, default=100, help="histogram bins (default 100)")
    d.add_argument("--per-channel", action="store_true", help="one histogram per output channel")
    d.add_argument("--refresh-every", type=int, default=0, help="rebuild the histograms every K steps (default 0: never)")
    d.add_argument("--layer-fraction", type=float, default=1.0,
                   help="noise only at this fraction of the sites, the noisiest (default 1: all)")
    d.add_argument("--rank-by", choices=["std", "relative"], default="std",
                   help="how --layer-fraction ranks sites: std(dy) (the authors, default) or std(dy)/rms(y_fp32)")
    d.add_argument("--sampler", choices=["auto", "compiled", "eager"], default="auto",
                   help="noise sampler implementation, same draws (auto: the compiled numba kernel on CPU, else eager torch)")
    c = p.add_argument_group("checkpoints and output")
    c.add_argument("--checkpoint", default=None,
                   help="checkpoint file (default .abfp_finetune/<model>-<method>.safetensors; '' disables)")
    c.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 50)")
    c.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint if there is one (same settings; it ends bit-identical to an "
                        "uninterrupted run)")
    c.add_argument("--force", action="store_true",
                   help="overwrite existing outputs (--json, --save-model) and, without --resume, an existing checkpoint")
    c.add_argument("--json", dest="json_path", default=None, help="write the measured numbers as JSON")
    c.add_argument("--save-model", default=None, help="write the finetuned float32 weights (safetensors)")
    c.add_argument("--time-steps", type=int, default=None, metavar="N",
                   help="instead of finetuning: time N interleaved float32, DNF and QAT steps on one batch")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    c.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)


def device_config(args: argparse.Namespace) -> ABFPConfig:
    """The device: --config / --preset (else the default scenario), then --tile-width/--gain/--noise."""
    try:
        if args.config or args.preset:
            cfg = _base_config(args)
        else:
            cfg = ABFPConfig(tile_width=DEFAULTS["tile_width"], gain=DEFAULTS["gain"], noise_std=DEFAULTS["noise_std"])
        changes = {k: v for k, v in (("tile_width", args.tile_width), ("gain", args.gain), ("noise_std", args.noise))
                   if v is not None}
        return cfg.replace(**changes) if changes else cfg
    except ValueError as e:
        raise UsageError(str(e)) from None


def _validate(args: argparse.Namespace) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UsageError(msg)

    args.loss = resolve_loss(args)
    need(args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    need(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    need(args.seed >= 0, f"--seed must be >= 0, got {args.seed}")
    need(args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    need(args.lr_decay > 0, f"--lr-decay must be > 0, got {args.lr_decay}")
    need(args.eval_samples >= 1, f"--eval-samples must be >= 1, got {args.eval_samples}")
    need(args.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    need(args.train_samples is None or args.train_samples >= args.batch_size,
         f"--train-samples ({args.train_samples}) must be at least one batch ({args.batch_size})")
    need(args.validation_samples is None or args.validation_samples >= 0,
         f"--validation-samples must be >= 0, got {args.validation_samples}")
    need(args.validate_every is None or args.validate_every >= 1, f"--validate-every must be >= 1, got {args.validate_every}")
    refuse_inapplicable(args, {"validate_every": "no validation (--validation-samples 0)"}
                        if args.validation_samples == 0 else {})
    need(args.checkpoint_every is None or args.checkpoint_every >= 1,
         f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    timing = "--time-steps times steps instead of finetuning: nothing is trained, written or resumed"
    refuse_inapplicable(args, {
        **({k: timing for k in ("json_path", "save_model", "resume", "checkpoint", "checkpoint_every",
                                "validation_samples", "validate_every")}
           if args.time_steps is not None else {}),
        **({"checkpoint_every": "no checkpoint is written (--checkpoint '')"} if args.checkpoint == "" else {})})
    args.checkpoint_every = 50 if args.checkpoint_every is None else args.checkpoint_every
    need(args.calibration_samples >= 1, f"--calibration-samples must be >= 1, got {args.calibration_samples}")
    need(args.bins >= 1, f"--bins must be >= 1, got {args.bins}")
    need(args.refresh_every >= 0, f"--refresh-every must be >= 0, got {args.refresh_every}")
    need(0 < args.layer_fraction <= 1, f"--layer-fraction must be in (0, 1], got {args.layer_fraction}")
    if args.method == "qat":
        dnf_only = [flag for flag, used in (
            ("--per-channel", args.per_channel), ("--refresh-every", args.refresh_every != 0),
            ("--layer-fraction", args.layer_fraction != 1.0), ("--bins", args.bins != 100),
            ("--calibration-samples", args.calibration_samples != 128), ("--sampler", args.sampler != "auto"),
            ("--rank-by", args.rank_by != "std"),
        ) if used]
        need(not dnf_only, f"{', '.join(dnf_only)} only apply to --method dnf")
    need(args.temperature is None or (args.temperature > 0 and args.temperature != float("inf")),
         f"--temperature must be > 0, got {args.temperature}")
    need(args.temperature is None or args.loss in ("kl", None), "--temperature only applies to --loss kl")
    need(math.isfinite(args.feature_weight) and args.feature_weight >= 0,
         f"--feature-weight must be a finite number >= 0, got {args.feature_weight}")
    need(args.feature_modules is None or args.feature_weight > 0, "--feature-modules goes with --feature-weight > 0")
    need(args.threads is None or args.threads >= 1, f"--threads must be >= 1, got {args.threads}")
    need(args.time_steps is None or args.time_steps >= 1, f"--time-steps must be >= 1, got {args.time_steps}")
    # before any work; whether an existing output may be replaced is decided in check_outputs
    # (with --resume, the outputs of the run being continued may be)
    check_output_args(argparse.Namespace(**{**vars(args), "force": args.force or args.resume}),
                      {"json_path": "--json", "save_model": "--save-model"})
    if args.checkpoint == "" and args.resume:
        raise UsageError("--resume needs a checkpoint (--checkpoint is '')")


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def cmd_finetune(args: argparse.Namespace) -> int:
    """``abfp finetune``; under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this with
    its share of each batch (see :mod:`abfp.finetune.parallel`) and rank 0 alone prints and
    writes files."""
    from ..evaluate.distributed import init_from_env
    from .parallel import leave

    _validate(args)
    rank, world_size = init_from_env("cpu")  # finetuning runs on the CPU: gloo
    ok = False
    try:
        code = _finetune(args, rank, world_size)
        ok = True
        return code
    finally:
        leave(ok)


def _finetune(args: argparse.Namespace, rank: int, world_size: int) -> int:
    import torch

    from .. import zoo
    from ..zoo.base import Dataset
    from .data import TRAINABLE_TASKS, split_task_data, training_data, unlabelled_data
    from .methods import dnf, qat

    if args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the number of processes ({world_size}): "
                         "each process takes an equal share of every batch")
    if args.time_steps and world_size > 1:
        raise UsageError("--time-steps times one process; run it without torchrun")
    show = print if rank == 0 else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    user = is_user_task(args.model)
    if not user and args.model not in TRAINABLE_TASKS + UNLABELLED_TASKS:
        raise UsageError(f"--model {args.model!r}: no training inputs known; choose one of "
                         f"{', '.join(TRAINABLE_TASKS + UNLABELLED_TASKS)}, or a user task (package.module:function)")
    task = user_task_loss(args) if user else None
    cfg = device_config(args)
    ckpt = None if args.time_steps else checkpoint_path(args)
    from .parallel import from_main

    resume_meta = from_main(lambda: check_outputs(args, ckpt))
    if resume_meta is not None:
        _adopt_checkpoint(args, ckpt, resume_meta, show)
    eval_data = None
    try:
        if user:  # the first --train-samples of its data (or its calibration split); evaluation on the rest
            train, eval_data, source = split_task_data(task, args.train_samples, args.eval_samples)
            show(f"training inputs: {source}")
            if args.loss != "ce":
                train = Dataset(train.inputs)
            elif train.targets is None:
                raise UsageError(f"--loss ce: {args.model}'s training inputs have no labels; use --loss kl, cosine "
                                 "or mse (label-free)")
        else:
            task = zoo.get(args.model)
            if args.loss == "ce":
                train = training_data(args.model, args.train_samples)
            else:
                train = unlabelled_data(args.model, args.train_samples)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--train-samples {args.train_samples}: {e}" if user else str(e)) from None
    note_fewer("--train-samples", args.train_samples, len(train), f"training inputs of {args.model}", quiet=rank != 0)
    if len(train) < args.batch_size:
        raise UsageError(f"the training set has {len(train)} samples, fewer than --batch-size {args.batch_size}")
    if args.time_steps:
        if args.loss != "ce":
            raise UsageError("--time-steps times labelled training steps; use it with --loss ce")
        return _time_steps(args, task, train, cfg)
    if eval_data is None:
        eval_data = task.load_data().take(args.eval_samples)
    if args.eval_samples != DEFAULTS["eval_samples"]:  # one given (the default is "at most 2000")
        note_fewer("--eval-samples", args.eval_samples, len(eval_data), f"evaluation inputs of {args.model}",
                   quiet=rank != 0)
    train, validation = _hold_out(args, train, show)
    if args.method == "dnf" and args.calibration_samples != 128:  # one given: the batch is the first training inputs
        note_fewer("--calibration-samples", args.calibration_samples, len(train), "training inputs", quiet=rank != 0)
    if ckpt and args.resume and resume_meta is None:
        show(f"note: no checkpoint at {ckpt}; starting from the beginning")

    common = dict(seed=args.seed, weight_decay=args.weight_decay, lr_decay=args.lr_decay, eval_data=eval_data,
                  metric=task.metric, eval_batch_size=args.eval_batch_size, checkpoint=ckpt,
                  checkpoint_every=args.checkpoint_every, resume=args.resume, progress=not args.no_progress,
                  desc=f"{args.method} {args.model}", validation=validation,
                  validate_every=args.validate_every or VALIDATE_EVERY,
                  **_loss_options(args))
    procs = f" on {world_size} processes" if world_size > 1 else ""
    how = "" if args.loss == "ce" else \
        f", label-free ({args.loss}{'' if args.temperature is None else f', T={args.temperature:g}'} to float32)"
    show(f"{args.method} on {args.model}{how}, device {cfg.label()}, {args.steps} steps, lr {args.lr:g}, "
         f"batch {args.batch_size}{procs}, {len(train)} training / {len(eval_data)} evaluation inputs")
    t0 = time.perf_counter()
    if args.method == "dnf":
        result = dnf(task.build_model(), train, cfg, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                     bins=args.bins, calibration_samples=args.calibration_samples, per_channel=args.per_channel,
                     refresh_every=args.refresh_every, layer_fraction=args.layer_fraction, rank_by=args.rank_by,
                     sampler=args.sampler,
                     **common)
    else:
        result = qat(task.build_model(), train, cfg, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                     **common)
    wall = time.perf_counter() - t0
    if rank != 0:
        return 0

    rf = result.recovered_fraction
    spec = ".2f" if task.metric.unit == "%" else ".4g"  # a KL of 0.004 is not 0.00
    print(f"  float32                     {_fmt(result.fp32_metric, spec)}")
    print(f"  device before finetuning    {_fmt(result.metric_before, spec)}")
    print(f"  device after {args.method} ({result.steps} steps)  {_fmt(result.metric_after, spec)}   "
          f"({_gain_text(result.recovered, task.metric.unit)}, {_fmt(None if rf is None else 100 * rf, '.0f')}% of the loss "
          "recovered)")
    if validation is not None and result.details.get("selected_step") is not None:
        d = result.details
        kept = "the last step's weights" if d["selected_step"] == result.steps else \
            ("the starting weights (no step lowered it)" if d["selected_step"] == 0
             else f"the weights of step {d['selected_step']}")
        print(f"  kept {kept}: device validation loss {d['validation_loss']:.4g} on {len(validation)} held-out "
              f"training inputs (start {d['validation_history'][0][1]:.4g}, last step {_fmt(d['validation_loss_last'], '.4g')})")
    ratio = result.step_time_ratio
    print(f"  step {_fmt(result.seconds_per_step, '.4f')} s, float32 step {_fmt(result.fp32_seconds_per_step, '.4f')} s "
          f"({_fmt(ratio, '.2f')}x); training {result.seconds_total:.1f} s; wall {wall:.1f} s")
    record = {**result.to_dict(), "model": args.model, "device": cfg.label(), "wall_seconds": wall,
              "checkpoint": ckpt, "loss": args.loss, "temperature": args.temperature,
              "train_samples": len(train)}
    if args.json_path:
        _write_json(args.json_path, record)
        print(f"wrote {args.json_path}")
    if args.save_model:
        from safetensors.torch import save_file

        from ..outputs import atomic_path

        with atomic_path(args.save_model) as tmp:
            save_file({k: v.detach().contiguous() for k, v in result.model.state_dict().items()}, str(tmp),
                      metadata={"method": args.method, "device": cfg.label(), "steps": str(result.steps),
                                "loss": args.loss})
        print(f"wrote {args.save_model}")
    return 0


def _gain_text(recovered: float | None, unit: str) -> str:
    """How much the metric improved: ``+1.25 points`` for a percentage, else ``better by 0.012`` /
    ``worse by 0.012`` (a lower-is-better metric's fall is an improvement, never ``-0.012 points``)."""
    if recovered is None:
        return "-"
    if unit == "%":
        return f"{recovered:+.2f} points"
    return f"{'better' if recovered >= 0 else 'worse'} by {abs(recovered):.4g}"


def _hold_out(args: argparse.Namespace, train: Any, show: Any) -> tuple[Any, Any]:
    """``(training, validation or None)``: the last ``--validation-samples`` training inputs held out
    (:func:`~.selection.split_validation`); the default, a fifth up to :data:`VALIDATION_MAX`, shrinks
    to leave one batch to train on (none when it cannot)."""
    from .selection import split_validation

    n, wanted = len(train), args.validation_samples
    if wanted == 0:
        return train, None
    if wanted is None:
        wanted = min(n // 5, VALIDATION_MAX, n - args.batch_size)
        if wanted < 1:
            show(f"note: {n} training inputs leave none to validate on with --batch-size {args.batch_size}; "
                 "the last step's weights are kept")
            return train, None
    elif n - wanted < args.batch_size:
        raise UsageError(f"--validation-samples {wanted} leaves {n - wanted} of the {n} training inputs, fewer than "
                         f"--batch-size {args.batch_size}")
    return split_validation(train, wanted)


def _loss_options(args: argparse.Namespace) -> dict[str, Any]:
    """``loss`` and ``temperature`` for :func:`abfp.finetune.qat` / ``dnf``: the names, or with
    ``--feature-weight`` one :class:`~.distillation.Distillation` holding all of them."""
    if args.loss == "ce":
        if args.feature_weight:
            raise UsageError("--feature-weight needs a label-free loss (--loss kl, cosine or mse), not ce")
        return {"loss": None, "temperature": args.temperature}
    if not args.feature_weight:
        return {"loss": args.loss, "temperature": args.temperature}
    from .distillation import Distillation

    t = 1.0 if args.temperature is None else args.temperature
    return {"loss": Distillation(args.loss, t, args.feature_weight, args.feature_modules), "temperature": None}


def user_task_loss(args: argparse.Namespace) -> Any:
    """Load a user task (before any work, so that a bad one fails first) and set ``args.loss``'s
    default from its metric (:func:`abfp.tune.finetune.default_loss`: ``kl`` for a percentage or
    KL metric, else ``cosine``); returns the task."""
    from ..tune.finetune import default_loss

    task = single_task(args.model, "finetune")
    if args.loss is None:
        args.loss = default_loss(task.metric)
    if args.temperature is not None and args.loss != "kl":
        raise UsageError("--temperature only applies to --loss kl")
    return task


def checkpoint_path(args: argparse.Namespace) -> str | None:
    """``--checkpoint`` (default ``.abfp_finetune/<model>-<method>.safetensors``, a user task's
    name with every character but letters, digits, ``.``, ``_`` and ``-`` as ``_``; ``''``: none)."""
    if args.checkpoint is None:
        loss = "" if getattr(args, "loss", None) in (None, "ce") else f"-{args.loss}"
        model = re.sub(r"[^A-Za-z0-9._-]", "_", args.model)
        return str(Path(".abfp_finetune") / f"{model}-{args.method}{loss}.safetensors")
    return args.checkpoint or None


def check_outputs(args: argparse.Namespace, ckpt: str | None) -> dict[str, Any] | None:
    """Check every output path before any work (one rule: an existing output needs --force).

    The checkpoint is the exception that ``--resume`` makes: then it is read (its metadata,
    which must be sound) and returned, and the run's own outputs (``--json``, ``--save-model``)
    may be replaced; without ``--resume`` an existing checkpoint needs ``--force``.
    Returns the checkpoint's metadata when resuming from one, else ``None``.
    """
    from ..outputs import OutputError, check_output
    from .checkpoint import read_meta

    named = [(flag, path) for flag, path in (("--json", args.json_path), ("--save-model", args.save_model),
                                             ("--checkpoint", ckpt)) if path]
    seen: dict[Path, str] = {}
    for flag, path in named:
        key = Path(path).absolute()
        if key in seen:
            raise UsageError(f"{seen[key]} and {flag} name the same file {path!r}")
        seen[key] = flag
    resuming = bool(args.resume and ckpt and Path(ckpt).is_file())
    try:
        for flag, path in named:
            if flag != "--checkpoint":
                # a resumed run may replace its own outputs (a run killed after writing them)
                check_output(path, force=args.force or resuming, what=f"{flag} file")
        if ckpt is None:
            return None
        check_output(ckpt, force=True, what="checkpoint")  # a folder, under a file, not writable
        exists = Path(ckpt).exists()
    except OutputError as e:
        raise UsageError(str(e)) from None
    if exists and not args.resume:
        if args.force:
            return None
        raise UsageError(f"checkpoint {ckpt!r} exists; pass --resume to continue it, or --force to start again "
                         "and overwrite it")
    return read_meta(ckpt) if exists else None


def _adopt_checkpoint(args: argparse.Namespace, ckpt: str | None, meta: dict[str, Any], show: Any) -> None:
    """Checks of ``--resume`` against the checkpoint's metadata, before any work: ``--steps``
    below its step is an error, equal means nothing left to train; without ``--threads`` the
    run takes the checkpoint's thread count (the sums of a step depend on it)."""
    import torch

    done = int(meta["step"])
    if args.steps < done:
        raise UsageError(f"--steps {args.steps} is below the {done} steps checkpoint {ckpt!r} already holds; "
                         f"pass --steps {done} or more to continue it (--steps counts from the start of the run)")
    if args.steps == done:
        show(f"note: checkpoint {ckpt} already holds all {done} steps: nothing left to train; "
             "evaluating it and writing the outputs")
    threads = meta.get("threads")
    if args.threads is None and isinstance(threads, int) and threads >= 1 and threads != torch.get_num_threads():
        show(f"note: {threads} torch threads, as the checkpoint was written (bit-identical resume needs the same)")
        torch.set_num_threads(threads)


def _write_json(path: str, record: dict[str, Any]) -> None:
    import json

    from ..outputs import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


def _time_steps(args: argparse.Namespace, task: Any, train: Any, cfg: ABFPConfig) -> int:
    from .timing import time_steps

    print(f"timing {args.time_steps} interleaved float32 / DNF / QAT steps of {args.model}, batch {args.batch_size}, "
          f"device {cfg.label()}")
    r = time_steps(task.build_model(), train, cfg, batch_size=args.batch_size, repeats=args.time_steps,
                   seed=args.seed, calibration_samples=args.calibration_samples, per_channel=args.per_channel,
                   sampler=args.sampler, lr=args.lr)
    for name in ("fp32", "dnf", "qat"):
        print(f"  {name:<5} median {r[name]['median']:.4f} s  mean {r[name]['mean']:.4f} s  "
              f"(CPU time median {r[name]['cpu_median']:.4f} s)")
    print(f"  DNF / float32 {r['dnf_ratio']:.2f}x   QAT / float32 {r['qat_ratio']:.2f}x   QAT / DNF {r['qat_to_dnf']:.2f}x"
          f"   (CPU time: DNF / float32 {r['dnf_ratio_cpu']:.2f}x, QAT / DNF {r['qat_to_dnf_cpu']:.2f}x)")
    if args.json_path:
        _write_json(args.json_path, {**r, "model": args.model, "device": cfg.label()})
        print(f"wrote {args.json_path}")
    return 0
