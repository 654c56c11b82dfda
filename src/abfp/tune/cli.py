"""``abfp tune`` (registered by :func:`abfp.cli.build_parser`).

    abfp tune --task efficientnet-lite0 --json plan.json
    abfp tune --task minilm-l6 --json out/plan.json --finetune distil-qat --finetune-steps 60
    abfp tune --task mytasks.py:make --json out/plan.json --out out --target 0.995 --force
    abfp eval --task efficientnet-lite0 --plan plan.json --weights plan.safetensors

Calibration (gains, repeats, finetuning) uses the task's calibration split when it has one
(EfficientNet-Lite0's other photos, MiniLM's other sentences), else its training split
(Fashion-MNIST), else the first ``--calibration`` samples of its data; the stages are measured
on the task's evaluation data (after those samples in the last case), never on calibration inputs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..cli_common import (
    UsageError,
    add_force_option,
    apply_threads,
    base_config,
    check_journal,
    check_output_args,
    check_output_dir,
    csv_list,
    note_fewer,
    refuse_inapplicable,
    refuse_overwriting_inputs,
    require_at_least,
    require_finite,
    single_task,
)
from ..finetune.cli import add_feature_arguments
from ..plotting import check_plotting
from .finetune import FINETUNE_METHODS
from .gains import power_of_two_gains

if TYPE_CHECKING:
    from ..zoo.base import Metric, Task


def _parser(sub) -> None:
    p = sub.add_parser("tune", help="a per-layer device plan (gains, repeats, finetuning) for a model, with a report",
                       description="Per-layer gains that minimise each layer's error, then per-layer repeats that "
                                   "reach a target at the least energy, then optional label-free finetuning. "
                                   "Calibration uses --calibration samples of the task's calibration split (else "
                                   "its training split, else its first samples); stage metrics are measured on "
                                   "--eval-samples of its evaluation data, never on calibration inputs.")
    p.add_argument("--task", default="fashion-cnn", help="zoo task, package.module:function or path.py:function")
    p.add_argument("--preset", default=None, help="base device (default: the authors' n=128 8/8/8 G=8, noise 1 bin)")
    p.add_argument("--config", default=None, help="base device as a JSON file or string")
    p.add_argument("--json", dest="json_path", required=True, help="write the DevicePlan here (JSON)")
    p.add_argument("--out", default=None, help="folder of the weights, report and plot (default: --json's folder)")
    p.add_argument("--calibration", type=int, default=None,
                   help=f"calibration samples (default {DEFAULT_CALIBRATION}, or all of a smaller calibration split, or "
                        "half of the data of a task without one)")
    p.add_argument("--eval-samples", type=int, default=None, help="evaluation samples after them (default: the rest)")
    p.add_argument("--gain-rule", choices=["error", "saturation", "energy"], default="error",
                   help="error: each layer's least-error gain; saturation: the largest power of two with at most 1e-4 "
                        "saturated; energy: gains and repeats together, the least energy that reaches --target")
    p.add_argument("--energy-budget", type=float, default=None,
                   help="with --gain-rule energy: the most accurate plan within this many times the single-gain "
                        "energy, instead of the cheapest that reaches --target")
    p.add_argument("--metric", choices=list(METRIC_CHOICES), default="task",
                   help="what the gains, repeats and stages are chosen and reported on: the task's own metric "
                        "(default), or top1 (needs labels), agreement, kl, cosine (to float32); the task's metrics "
                        "are still reported beside it")
    p.add_argument("--refine", type=int, default=0,
                   help="with --gain-rule energy: check the rule's choice for this many modules (largest predicted "
                        "loss first) on the calibration inputs, each moved to the neighbouring gain that scores best "
                        "there at no more energy (default 0: none)")
    p.add_argument("--refine-passes", type=int, default=1,
                   help="with --refine: go through those modules again, up to this many passes in all, while the "
                        "last pass moved one (0: until a pass moves nothing; default 1)")
    p.add_argument("--refine-fill", action="store_true",
                   help="with --refine: spend the energy left under --energy-budget on the energy rule's next moves "
                        "of the other modules, kept when that scores better on the calibration inputs")
    p.add_argument("--refine-margin", type=float, default=0.0,
                   help="with --refine: move a module only when that beats the plan on the calibration inputs by "
                        "more than this fraction of its metric (default 0: any improvement)")
    p.add_argument("--gains-per-octave", type=int, default=None,
                   help="candidate gains 2**(j/N) up to --max-gain (arbitrary gains; default 1: powers of two)")
    p.add_argument("--gains", type=csv_list(float, "--gains"), default=None,
                   help="allowed gain values (default: powers of two up to --max-gain)")
    p.add_argument("--max-gain", type=float, default=None,
                   help="the largest candidate gain (default 256; not with --gains, which lists them)")
    p.add_argument("--gain-samples", type=int, default=32, help="calibration samples for the gains (default 32)")
    p.add_argument("--gain-tolerance", type=float, default=None,
                   help="error rule: keep the smallest gain whose error is within (1 + tol) x the least "
                        "(a gain G costs G x the analog energy; default 0)")
    p.add_argument("--gain-descent", action="store_true",
                   help="then lower the gains, most expensive layer first, while --target is still reached on the "
                        "calibration inputs (energy)")
    p.add_argument("--no-repeats", action="store_true", help="skip the repeats stage")
    p.add_argument("--max-repeats", type=int, default=None, help="the most repeats of a module (default 16)")
    p.add_argument("--target", type=float, default=None,
                   help="metric to reach (default: float32 minus 0.3 points, or minus 0.005)")
    f = p.add_argument_group("label-free finetuning (distillation from the float32 model on the calibration inputs)")
    f.add_argument("--finetune", choices=["none", *FINETUNE_METHODS], default="none",
                   help="distil-qat: train through the plan's devices; distil-dnf: float32 plus the plan's measured "
                        "noise; bias-correct: subtract each layer's per-channel mean device error, measured with the "
                        "upstream layers on the device and corrected (no training; default none)")
    f.add_argument("--finetune-steps", type=int, default=None, help=f"AdamW steps (default {FT_DEFAULTS['steps']})")
    f.add_argument("--finetune-lr", type=float, default=None, help=f"learning rate (default {FT_DEFAULTS['lr']:g})")
    f.add_argument("--finetune-batch-size", type=int, default=None,
                   help=f"calibration inputs per step (default: the task's own where it declares one, "
                        f"Task.finetune_batch_size, e.g. 8 for efficientnet-lite0; else {FT_DEFAULTS['batch_size']})")
    f.add_argument("--finetune-samples", type=int, default=None,
                   help=f"bias-correct: calibration inputs measured, as one batch (default {BC_DEFAULTS['samples']})")
    f.add_argument("--finetune-inputs", choices=["fresh", "fixed"], default=None,
                   help="distil-qat/dnf: fresh = a new batch every step from the task's sample_finetuning_batch "
                        "(e.g. random crops of the calibration photos), fixed = the calibration inputs (default: "
                        "fresh where the task has such a sampler, else fixed)")
    f.add_argument("--finetune-loss", choices=["kl", "cosine", "mse"], default=None,
                   help="kl on logits, cosine or mse on embeddings (default: kl for a classifier, else cosine)")
    f.add_argument("--finetune-temperature", type=float, default=None,
                   help="kl loss: the softmax temperature T of T^2 KL(softmax(t/T) || softmax(s/T)) (default 1)")
    f.add_argument("--finetune-schedule", choices=["constant", "cosine"], default=None,
                   help="distil-qat/dnf: the learning rate over the steps: constant, or cosine (a linear warm-up over "
                        "--finetune-warmup steps, then half a cosine from --finetune-lr to nearly 0; default constant)")
    f.add_argument("--finetune-warmup", type=int, default=None,
                   help="with --finetune-schedule cosine: linear warm-up steps (default 0)")
    add_feature_arguments(f, "finetune-", None)
    p.add_argument("--energy-samples", type=int, default=1,
                   help="calibration inputs accounted together for the energy per inference (weights are converted "
                        "once per call); default 1, one inference alone, as abfp energy and abfp explore count it")
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's own")
    p.add_argument("--seed", type=int, default=None,
                   help="noise seed of the stages, gains and finetuning (default 0, or the device's own)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its journal (<json stem>.journal.json beside the outputs): "
                        "finished stages are not recomputed, a finetuning continues from its last checkpoint; "
                        "refused when the journal was written by a run with other settings, model or data")
    add_force_option(p)
    p.set_defaults(func=cmd_tune)


#: Defaults of the finetuning options.
FT_DEFAULTS = {"steps": 100, "lr": 1e-5, "batch_size": 32}
#: Defaults of the bias correction's options.
BC_DEFAULTS = {"samples": 64}
#: ``--calibration``'s default: at most this many calibration samples.
DEFAULT_CALIBRATION = 64


#: ``--metric`` names: the task's own, or one of :data:`abfp.zoo.METRICS` (tested to match).
METRIC_CHOICES = ("task", "top1", "agreement", "kl", "cosine")


def tune_metrics(task: Task, choice: str) -> tuple[Metric, list[Metric]]:
    """The metric ``--metric`` names for ``task``, and the task's metrics to report beside it."""
    from .. import zoo

    metric = task.metric if choice == "task" else zoo.METRICS[choice]
    extras = [m for m in [task.metric, *zoo.extra_metrics(task.name)] if m.name != metric.name]
    return metric, extras


def register(sub) -> None:
    _parser(sub)


def output_names(json_path: str) -> tuple[str, str, str]:
    """Weights, report and plot file names beside the plan ``<stem>.json``."""
    stem = Path(json_path).stem
    return f"{stem}.safetensors", f"{stem}.report.md", f"{stem}.png"


def cmd_tune(args: argparse.Namespace) -> int:
    require_at_least(args, ("calibration", "eval_samples", "gain_samples", "max_repeats", "batch_size", "threads",
                            "finetune_steps", "finetune_batch_size", "finetune_samples", "gains_per_octave", "energy_samples"))
    require_at_least(args, ("seed",), 0)
    require_finite(args, ("max_gain", "target", "gain_tolerance", "finetune_lr", "finetune_temperature",
                          "finetune_feature_weight", "energy_budget"))
    if args.refine < 0:
        raise UsageError(f"--refine must be >= 0 (modules to refine), got {args.refine}")
    if args.refine and args.gain_rule != "energy":
        raise UsageError("--refine goes with --gain-rule energy")
    if args.refine_passes < 0:
        raise UsageError(f"--refine-passes must be >= 0 (0: until a pass moves nothing), got {args.refine_passes}")
    if not 0 <= args.refine_margin < 1:
        raise UsageError(f"--refine-margin must be in [0, 1) (a fraction of the metric), got {args.refine_margin}")
    if (args.refine_passes != 1 or args.refine_fill or args.refine_margin) and not args.refine:
        raise UsageError("--refine-passes, --refine-fill and --refine-margin go with --refine N")
    if args.energy_budget is not None and (args.gain_rule != "energy" or args.energy_budget <= 0):
        raise UsageError(f"--energy-budget goes with --gain-rule energy and must be > 0, got {args.energy_budget}")
    refuse_inapplicable(args, {
        **({"max_gain": "--gains lists the candidate gains"} if args.gains is not None else {}),
        **({"max_repeats": "no repeats are chosen (--no-repeats)"} if args.no_repeats else {})})
    args.max_gain = 256.0 if args.max_gain is None else args.max_gain
    args.max_repeats = 16 if args.max_repeats is None else args.max_repeats
    finetune_options = _finetune_options(args)
    if args.gain_tolerance is not None:
        if args.gain_tolerance < 0:
            raise UsageError(f"--gain-tolerance must be >= 0, got {args.gain_tolerance}")
        if args.gain_rule == "saturation":
            raise UsageError("--gain-tolerance goes with the error rule (--gain-rule error)")
    if args.max_gain < 1:
        raise UsageError(f"--max-gain must be >= 1, got {args.max_gain}")
    for g in args.gains or ():
        if not (math.isfinite(g) and g > 0):
            raise UsageError(f"--gains: {g} is not a finite number > 0")
    if args.gains is not None and args.gain_rule == "saturation":
        raise UsageError("--gains lists values for the error rule; the saturation rule searches powers of two")
    if args.gains_per_octave is not None:
        if args.gains is not None or args.gain_rule == "saturation":
            raise UsageError("--gains-per-octave goes with the error or energy rule, without --gains")
        args.gains = power_of_two_gains(args.max_gain, args.gains_per_octave)
    if args.gain_rule == "energy" and (args.gain_tolerance is not None or args.gain_descent):
        raise UsageError("--gain-rule energy chooses the gains for --target itself: --gain-tolerance and --gain-descent "
                         "go with the error rule")
    cfg = base_config(args)
    if cfg.noise_std == 0 and args.finetune in ("none", "bias-correct"):  # a distillation also seeds its inputs
        refuse_inapplicable(args, {"seed": "the device is noise-free (noise 0) and no distillation runs: nothing "
                                           "is drawn"})
    if args.seed is not None and cfg.seed is not None and args.seed != cfg.seed:
        raise UsageError(f"--seed {args.seed} and the device's own seed {cfg.seed} (execution.seed): give one")
    args.seed = 0 if args.seed is None else args.seed
    if cfg.mode != "abfp" or cfg.repeats != 1:
        raise UsageError("abfp tune plans an ABFP device: give a base config with mode 'abfp' and repeats 1")
    calibration_default = args.calibration is None
    if calibration_default:
        args.calibration = DEFAULT_CALIBRATION  # as the journal records it
    out_dir = Path(args.out) if args.out is not None else Path(args.json_path).parent
    if args.out is not None:  # named as --out, before the journal inside it is looked at
        check_output_dir(out_dir, force=True, what="--out")
    journal = out_dir / journal_name(args.json_path)
    resuming = check_journal(journal, args)  # a resumed run may replace its own outputs
    (plan_path,) = check_output_args(argparse.Namespace(**{**vars(args), "force": args.force or resuming}),
                                     {"json_path": "--json"})
    names = output_names(args.json_path)
    check_output_dir(out_dir, list(names), force=args.force or resuming, what="--out")
    refuse_overwriting_inputs(args, {out_dir / n: "--out" for n in names})
    check_plotting()  # the plot is written last: a missing matplotlib must not fail the run at its end
    task = single_task(args.task, "tune")
    metric, extras = tune_metrics(task, args.metric)
    _add_fresh_inputs(finetune_options, args, task)
    _task_batch_size(finetune_options, args, task)
    apply_threads(args.threads)
    calib, evald, source = split_data(task, args.calibration, args.eval_samples, at_most=calibration_default)
    note_fewer("--eval-samples", args.eval_samples, len(evald), f"evaluation samples of {task.name} (after the "
               "calibration samples)")
    for option, asked in (("--gain-samples", args.gain_samples if args.gain_samples != 32 else None),  # given
                          ("--energy-samples", args.energy_samples), ("--finetune-samples", args.finetune_samples)):
        note_fewer(option, asked, len(calib), "calibration samples")
    if metric.kind == "accuracy" and (calib.targets is None or evald.targets is None):
        raise UsageError(f"--metric {args.metric}: {metric.name} scores against labels, and task {task.name!r} has "
                         "none; use agreement, kl or cosine (to float32)")

    from tqdm.auto import tqdm

    from .api import tune
    from .journal import JournalMismatch, remove_tune_journal
    from .report import write_plot, write_report

    stages = 2 + args.gain_descent + (not args.no_repeats and args.gain_rule != "energy") + (args.finetune != "none")
    bar = tqdm(total=stages, desc=f"tune {task.name}", unit="stage", disable=args.no_progress, leave=False)

    def progress(line: str) -> None:
        if not line.startswith(" "):
            bar.update(1)
        if not args.no_progress:
            tqdm.write(line, file=sys.stderr)

    try:
        res = tune(task.build_model(), calib.inputs, cfg, metric=metric, target=args.target,
                   calibration_targets=calib.targets, eval_inputs=evald.inputs, eval_targets=evald.targets,
                   gain_rule=args.gain_rule, gains=args.gains, max_gain=args.max_gain,
                   gain_tolerance=args.gain_tolerance or 0.0, gain_descent=args.gain_descent,
                   energy_budget=args.energy_budget, refine=args.refine,
                   refine_passes=args.refine_passes or None, refine_fill=args.refine_fill,
                   refine_margin=args.refine_margin,
                   gain_samples=args.gain_samples, repeats=not args.no_repeats, max_repeats=args.max_repeats,
                   finetune=None if args.finetune == "none" else args.finetune, finetune_options=finetune_options,
                   extra_metrics=extras,
                   batch_size=args.batch_size or task.default_batch_size, energy_samples=args.energy_samples,
                   seed=args.seed, progress=progress, journal=journal, resume=args.resume)
    except JournalMismatch as e:
        raise UsageError(f"--resume: {e}") from None
    finally:
        bar.close()
    res.plan.info.update(task=task.name, calibration_samples=len(calib), calibration_source=source,
                         eval_samples=len(evald))
    from ..outputs import atomic_write_text
    from .provenance import save_weights

    weights, report, plot = (out_dir / n for n in names)
    res.plan.info["weights"] = save_weights(res.model, weights)
    atomic_write_text(plan_path, res.plan.to_json() + "\n")
    write_plot(res, plot)
    cmd = f"abfp tune {' '.join(sys.argv[2:])}" if len(sys.argv) > 2 else "abfp tune"
    write_report(res, report, plot.name, task.name, cmd)
    remove_tune_journal(journal)  # the outputs are written: nothing left to resume
    print(res.table())
    print(f"wrote {plan_path}, {weights}, {report}, {plot}")
    return 0


def journal_name(json_path: str) -> str:
    """The journal of a run writing the plan ``<stem>.json`` (:mod:`.journal`)."""
    return f"{Path(json_path).stem}.journal.json"


def _finetune_options(args: argparse.Namespace) -> dict[str, object] | None:
    """The ``--finetune-*`` options as :class:`~.finetune.DistilStage` fields (``None`` without
    ``--finetune``; giving them without it is an error)."""
    given = {k: getattr(args, f"finetune_{k}") for k in ("steps", "lr", "batch_size", "loss", "samples", "schedule",
                                                         "warmup", "temperature", "feature_weight",
                                                         "feature_modules")}
    given = {k: v for k, v in given.items() if v is not None}

    def flag(k: str) -> str:
        return f"--finetune-{k.replace('_', '-')}"

    if args.finetune == "none":
        if given:
            raise UsageError(f"{flag(next(iter(given)))} goes with --finetune {'|'.join(FINETUNE_METHODS)}")
        return None
    if args.finetune == "bias-correct":
        other = [k for k in given if k not in BC_DEFAULTS]
        if other:
            raise UsageError(f"{flag(other[0])} goes with --finetune distil-qat|distil-dnf, not bias-correct")
        return {**BC_DEFAULTS, **given}
    if "samples" in given:
        raise UsageError("--finetune-samples goes with --finetune bias-correct")
    if "lr" in given and given["lr"] <= 0:
        raise UsageError(f"--finetune-lr must be > 0, got {given['lr']}")
    if "temperature" in given and given["temperature"] <= 0:
        raise UsageError(f"--finetune-temperature must be > 0, got {given['temperature']}")
    if "temperature" in given and given.get("loss", "kl") != "kl":
        raise UsageError("--finetune-temperature goes with --finetune-loss kl")
    if "feature_weight" in given and given["feature_weight"] < 0:
        raise UsageError(f"--finetune-feature-weight must be >= 0, got {given['feature_weight']}")
    if "feature_modules" in given and not given.get("feature_weight"):
        raise UsageError("--finetune-feature-modules goes with --finetune-feature-weight > 0")
    if "warmup" in given and given.get("schedule") != "cosine":
        raise UsageError("--finetune-warmup goes with --finetune-schedule cosine")
    steps = given.get("steps", FT_DEFAULTS["steps"])
    if "warmup" in given and not 0 <= given["warmup"] < steps:
        raise UsageError(f"--finetune-warmup must be >= 0 and below the steps ({steps}), got {given['warmup']}")
    return {**FT_DEFAULTS, **given, "progress": not args.no_progress}


def _add_fresh_inputs(options: dict[str, object] | None, args: argparse.Namespace, task) -> None:
    """``--finetune-inputs``: the task's :attr:`~abfp.zoo.Task.sample_finetuning_batch` as the
    distillation's ``fresh_inputs`` (by default wherever the task has one)."""
    sampler = getattr(task, "sample_finetuning_batch", None)
    if args.finetune_inputs is not None and args.finetune not in ("distil-qat", "distil-dnf"):
        raise UsageError("--finetune-inputs goes with --finetune distil-qat|distil-dnf")
    if args.finetune_inputs == "fresh" and sampler is None:
        raise UsageError(f"--finetune-inputs fresh: task {task.name!r} has no sample_finetuning_batch "
                         "(use --finetune-inputs fixed)")
    if options is not None and args.finetune in ("distil-qat", "distil-dnf") and sampler is not None \
            and args.finetune_inputs != "fixed":
        options["fresh_inputs"] = sampler


def _task_batch_size(options: dict[str, object] | None, args: argparse.Namespace, task) -> None:
    """The task's :attr:`~abfp.zoo.Task.finetune_batch_size` as the distillation's batch size when
    ``--finetune-batch-size`` is not given."""
    default = getattr(task, "finetune_batch_size", None)
    if options is not None and args.finetune in ("distil-qat", "distil-dnf") and args.finetune_batch_size is None \
            and default is not None:
        options["batch_size"] = default


def split_data(task, calibration: int, eval_samples: int | None, *, at_most: bool = False):
    """:func:`abfp.finetune.data.split_task_data` with ``--calibration`` in its errors."""
    from ..finetune.data import split_task_data

    try:
        return split_task_data(task, calibration, eval_samples, at_most=at_most)
    except ValueError as e:
        raise UsageError(f"--calibration {calibration}: {e}") from None
