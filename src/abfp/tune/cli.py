"""``abfp tune`` (registered by :func:`abfp.cli.build_parser`).

    abfp tune --task efficientnet-lite0 --json plan.json
    abfp tune --task mytasks.py:make --json out/plan.json --out out --target 0.995 --force
    abfp eval --task efficientnet-lite0 --plan plan.json --weights plan.safetensors
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..cli_common import (
    UsageError,
    add_force_option,
    apply_threads,
    base_config,
    check_output_args,
    check_output_dir,
    csv_list,
    require_at_least,
    require_finite,
    single_task,
)


def _parser(sub) -> None:
    p = sub.add_parser("tune", help="a per-layer device plan (gains, repeats) for a model, with a report",
                       description="Per-layer gains that minimise each layer's error, then per-layer repeats that "
                                   "reach a target at the least energy. Calibration uses the task's first "
                                   "--calibration samples; stage metrics are measured on the next --eval-samples.")
    p.add_argument("--task", default="fashion-cnn", help="zoo task, package.module:function or path.py:function")
    p.add_argument("--preset", default=None, help="base device (default: the authors' n=128 8/8/8 G=8, noise 1 bin)")
    p.add_argument("--config", default=None, help="base device as a JSON file or string")
    p.add_argument("--json", dest="json_path", required=True, help="write the DevicePlan here (JSON)")
    p.add_argument("--out", default=None, help="folder of the weights, report and plot (default: --json's folder)")
    p.add_argument("--calibration", type=int, default=64, help="calibration samples (default 64)")
    p.add_argument("--eval-samples", type=int, default=None, help="evaluation samples after them (default: the rest)")
    p.add_argument("--gain-rule", choices=["error", "saturation"], default="error")
    p.add_argument("--gains", type=csv_list(float, "--gains"), default=None,
                   help="allowed gain values (default: powers of two up to --max-gain)")
    p.add_argument("--max-gain", type=float, default=256.0)
    p.add_argument("--gain-samples", type=int, default=32, help="calibration samples for the gains (default 32)")
    p.add_argument("--no-repeats", action="store_true", help="skip the repeats stage")
    p.add_argument("--max-repeats", type=int, default=16)
    p.add_argument("--target", type=float, default=None,
                   help="metric to reach (default: float32 minus 0.3 points, or minus 0.005)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    add_force_option(p)
    p.set_defaults(func=cmd_tune)


def register(sub) -> None:
    _parser(sub)


def output_names(json_path: str) -> tuple[str, str, str]:
    """Weights, report and plot file names beside the plan ``<stem>.json``."""
    stem = Path(json_path).stem
    return f"{stem}.safetensors", f"{stem}.report.md", f"{stem}.png"


def cmd_tune(args: argparse.Namespace) -> int:
    require_at_least(args, ("calibration", "eval_samples", "gain_samples", "max_repeats", "batch_size", "threads"))
    require_at_least(args, ("seed",), 0)
    require_finite(args, ("max_gain", "target"))
    if args.max_gain < 1:
        raise UsageError(f"--max-gain must be >= 1, got {args.max_gain}")
    for g in args.gains or ():
        if not (math.isfinite(g) and g > 0):
            raise UsageError(f"--gains: {g} is not a finite number > 0")
    if args.gains is not None and args.gain_rule == "saturation":
        raise UsageError("--gains lists values for the error rule; the saturation rule searches powers of two")
    cfg = base_config(args)
    if cfg.mode != "abfp" or cfg.repeats != 1:
        raise UsageError("abfp tune plans an ABFP device: give a base config with mode 'abfp' and repeats 1")
    (plan_path,) = check_output_args(args, {"json_path": "--json"})
    out_dir = Path(args.out) if args.out is not None else plan_path.parent
    names = output_names(args.json_path)
    check_output_dir(out_dir, list(names), force=args.force, what="--out")
    task = single_task(args.task, "tune")
    apply_threads(args.threads)
    data = task.load_data()
    if args.calibration >= len(data):
        raise UsageError(f"--calibration {args.calibration}: {task.name} has {len(data)} samples; leave some to evaluate")
    end = len(data) if args.eval_samples is None else min(len(data), args.calibration + args.eval_samples)
    cal = tuple(t[: args.calibration] for t in data.inputs)
    ev = tuple(t[args.calibration:end] for t in data.inputs)
    tg = data.targets

    from tqdm.auto import tqdm

    from ..outputs import atomic_path
    from .api import tune
    from .report import write_plot, write_report

    bar = tqdm(total=4, desc=f"tune {task.name}", unit="stage", disable=args.no_progress, leave=False)

    def progress(line: str) -> None:
        if not line.startswith(" "):
            bar.update(1)
        if not args.no_progress:
            tqdm.write(line, file=sys.stderr)

    try:
        res = tune(task.build_model(), cal, cfg, metric=task.metric, target=args.target,
                   calibration_targets=None if tg is None else tg[: args.calibration],
                   eval_inputs=ev, eval_targets=None if tg is None else tg[args.calibration:end],
                   gain_rule=args.gain_rule, gains=args.gains, max_gain=args.max_gain,
                   gain_samples=args.gain_samples, repeats=not args.no_repeats, max_repeats=args.max_repeats,
                   batch_size=args.batch_size or task.default_batch_size, seed=args.seed, progress=progress)
    finally:
        bar.close()
    res.plan.info.update(task=task.name, calibration_samples=args.calibration, eval_samples=end - args.calibration)
    from safetensors.torch import save_file

    from ..outputs import atomic_write_text

    weights, report, plot = (out_dir / n for n in names)
    state = {k: v.detach().contiguous().clone() for k, v in res.model.state_dict().items()}
    with atomic_path(weights, suffix=".tmp.safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write_text(plan_path, res.plan.to_json() + "\n")
    write_plot(res, plot)
    cmd = f"abfp tune {' '.join(sys.argv[2:])}" if len(sys.argv) > 2 else "abfp tune"
    write_report(res, report, plot.name, task.name, cmd)
    print(res.table())
    print(f"wrote {plan_path}, {weights}, {report}, {plot}")
    return 0
