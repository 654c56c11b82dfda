"""The ``abfp`` command.

    abfp eval                      the embedded default: Fashion-MNIST CNN, fp32 vs fixed vs ABFP grid
    abfp eval --task fashion-vit --tile-widths 8,128 --gains 1,8,auto --runs 5 --json out.json
    abfp eval --paper              the authors' whole grid on the zoo (long)
    abfp report out.json --out report/
    abfp microbench                the authors' micro-benchmark (element-wise error vs n and G)
    abfp summary --task fashion-cnn --preset default
    abfp finetune --method dnf     differential noise finetuning (or --method qat)
    abfp precision --noise shot    learned per-layer energy under shot noise
    abfp energy --task fashion-cnn energy and operation counts per layer
    abfp tune --task NAME --json plan.json   a per-layer device plan (gains, repeats) and a report
    abfp explore --task fashion-cnn --target-drop 1 --json explore.json   design the device
    abfp presets | abfp zoo
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .allocator import keep_freed_memory
from .cli_common import (
    OneLineParser,
    UsageError,
    add_force_option,
    apply_threads,
    base_config,
    check_output_args,
    check_output_dir,
    csv_list,
    device_plan_arg,
    json_kind,
    load_plan_arg,
    note_evaluated,
    plan_model,
    print_error,
    refuse_inapplicable,
    refuse_overwriting_inputs,
    require_at_least,
    require_finite,
    resolve_device,
    resolve_tasks,
)
from .config import REFERENCE_NOISE_STD, ABFPConfig, presets
from .outputs import atomic_write_text
from .plotting import check_plotting

#: Samples of the embedded default run of ``abfp eval`` (no --task, no --samples).
DEFAULT_SAMPLES = 1000

#: The sweep of ``abfp eval`` when neither --preset nor --config names a base device.
DEFAULT_SWEEP: dict[str, Any] = {
    "tile_widths": [8, 32, 128],
    "gains": ["1", "2", "4", "8", "16"],
    "bits": ["8/8/8"],
    "noise": [REFERENCE_NOISE_STD],
    "noise_dist": "uniform",
}

# former private names, kept for callers outside this package
_csv = csv_list
_base_config = base_config
_resolve_tasks = resolve_tasks
__all__ = ["main", "build_parser", "UsageError", "DEFAULT_SAMPLES", "DEFAULT_SWEEP"]


# ------------------------------------------------------------------------------ eval
def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate zoo or user models on the device across a grid",
                       description="Evaluate models on the ABFP device against float32 and the fixed-point baseline. "
                                   "The device of every row is --preset or --config (else the default config) with "
                                   "the sweep options given on the command line applied on top; without a preset or "
                                   "config the sweep defaults are n=8,32,128, G=1..16, 8/8/8, noise 0.2887 uniform.")
    p.add_argument("--task", "--model", dest="tasks", action="append", default=None,
                   help="zoo task name or package.module:function returning (model, data, metric); repeatable "
                        "(default: fashion-cnn). 'all' runs the whole zoo")
    p.add_argument("--tile-widths", type=csv_list(int, "--tile-widths"), default=None,
                   help="comma list of tile widths n (default: the base device's, else 8,32,128)")
    p.add_argument("--gains", type=csv_list(str, "--gains"), default=None,
                   help="comma list of gains; 'auto' picks a gain per layer from calibration data "
                        "(default: the base device's, else 1,2,4,8,16)")
    p.add_argument("--bits", type=csv_list(str, "--bits"), default=None,
                   help="weights/inputs/ADC, e.g. 8/8/8,6/6/8 (default: the base device's, else 8/8/8)")
    p.add_argument("--noise", type=csv_list(float, "--noise"), default=None,
                   help="device noise std in ADC LSBs, comma list sweeps (default: the base device's, else one "
                        "bin wide: 0.2887)")
    p.add_argument("--noise-dist", choices=["uniform", "gaussian"], default=None,
                   help="(default: the base device's, else uniform)")
    p.add_argument("--runs", type=int, default=None, help="runs per noisy point (mean and std reported; default 3)")
    p.add_argument("--samples", type=int, default=None, help="evaluate the first N samples (default: the task's own)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's own")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N, mps")
    p.add_argument("--seed", type=int, default=None, help="seed of the device noise (run r: seed + r; default 0)")
    p.add_argument("--no-fixed", action="store_true", help="skip the fixed-point baseline")
    p.add_argument("--fixed-percentile", type=float, default=None,
                   help="percentile of |activation| used as the fixed-point static scale (default 100: the max)")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="calibration inputs (the task's calibration split, else the first evaluated ones) that set "
                        "fixed-point scales and auto gains: min(N, samples evaluated) (default 256)")
    p.add_argument("--paper", action="store_true",
                   help="the authors' whole grid on the zoo: 6/6/8 and 8/8/8, n=8,32,128, G=1..16, 10 runs")
    p.add_argument("--json", dest="json_path", default=None, help="write the records as a JSON list")
    p.add_argument("--cache-dir", default=".abfp_cache", help="resumable cache of finished runs ('' disables)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--preset", default=None, help="base device (abfp presets); the sweep options override only "
                                                  "the fields they name")
    p.add_argument("--config", default=None, help="base device as a JSON file or string (like --preset)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plan", default=None, help="evaluate a device plan (abfp tune --json) instead of a grid")
    p.add_argument("--weights", default=None,
                   help="load these weights (safetensors: abfp tune's, abfp finetune --save-model's) into the task's "
                        "model before evaluating it; with --plan, the plan's weights; one --task")
    add_force_option(p)
    p.set_defaults(func=cmd_eval)


#: What --paper sets: the authors' grid.
_PAPER = {"bits": ["6/6/8", "8/8/8"], "gains": ["1", "2", "4", "8", "16"], "tile_widths": [8, 32, 128], "runs": 10}


def eval_sweep(args: argparse.Namespace) -> tuple[ABFPConfig, dict[str, Any]]:
    """The base device and the sweep of ``abfp eval``.

    The base device is ``--preset`` / ``--config`` (else the default :class:`ABFPConfig`). Each
    sweep dimension (``tile_widths``, ``gains``, ``bits``, ``noise``, ``noise_dist``) is the
    option given on the command line (or by ``--paper``); a dimension not given is the base
    device's own value when a preset or config was named, else :data:`DEFAULT_SWEEP`'s.
    """
    base = base_config(args)
    named = args.preset is not None or args.config is not None
    own = {"tile_widths": [base.tile_width], "gains": [f"{base.gain!r}"],
           "bits": [f"{base.weight_bits}/{base.input_bits}/{base.output_bits}"],
           "noise": [base.noise_std], "noise_dist": base.noise_dist}
    sweep: dict[str, Any] = {}
    for key, default in DEFAULT_SWEEP.items():
        given = getattr(args, key)
        sweep[key] = given if given is not None else (own[key] if named else default)
    sweep["runs"] = args.runs if args.runs is not None else 3
    if args.paper:
        clash = [f"--{k.replace('_', '-')}" for k in _PAPER if getattr(args, k) is not None]
        if clash:
            raise UsageError(f"--paper sets the grid; drop {', '.join(clash)}")
        sweep.update(_PAPER)
    return base, sweep


def _validate_eval(args: argparse.Namespace) -> None:
    require_at_least(args, ("runs", "samples", "batch_size", "threads", "calibration_samples"))
    require_at_least(args, ("seed",), 0)
    require_finite(args, ("fixed_percentile",))
    if args.fixed_percentile is not None and not 0 < args.fixed_percentile <= 100:
        raise UsageError(f"--fixed-percentile must be in (0, 100], got {args.fixed_percentile}")
    for n in args.tile_widths or ():
        if n < 1:
            raise UsageError(f"--tile-widths: {n} is not a positive integer")
    for z in args.noise or ():
        if not math.isfinite(z) or z < 0:
            raise UsageError(f"--noise: {z} is not a finite number >= 0")


def eval_points(args: argparse.Namespace) -> tuple[list[Any], int]:
    """The grid points of ``abfp eval`` and the runs per noisy point (a bad value: UsageError)."""
    from .evaluate import build_grid, parse_bits, parse_gain

    base, sweep = eval_sweep(args)
    try:
        gains = [parse_gain(g) for g in sweep["gains"]]
        bits = [parse_bits(b) for b in sweep["bits"]]
        base = base.replace(noise_dist=sweep["noise_dist"])
        # every swept value on its own, so that a bad one is refused before any work
        for w, x, y in bits:
            base.replace(weight_bits=w, input_bits=x, output_bits=y)
        for ns in sweep["noise"]:
            base.replace(noise_std=ns)
        for n in sweep["tile_widths"]:
            base.replace(tile_width=n)
    except ValueError as e:
        raise UsageError(str(e)) from None
    # the fixed-point baseline is the base device in fixed mode: at its tile width (128 without
    # --preset / --config, the authors' baseline), whichever tile widths the ABFP rows sweep
    points = build_grid(tile_widths=sweep["tile_widths"], gains=gains, bits=bits, noise_stds=sweep["noise"],
                        fixed=not args.no_fixed, fixed_tile_width=base.tile_width, base=base)
    return points, sweep["runs"]


def _refuse_inapplicable_eval(args: argparse.Namespace, points: Sequence[Any], plan: Any) -> None:
    """Options that would change no row of this grid are refused; the others get their defaults."""
    fixed = any(p.format == "fixed" for p in points)
    auto = any(p.auto_gain for p in points)
    noisy = any(p.noisy for p in points) or (plan is not None and any(c.noise_std > 0 for c in plan.modules.values()))
    why: dict[str, str] = {}
    if not fixed:
        why["fixed_percentile"] = "no fixed-point row is evaluated (--no-fixed, --plan or a fixed-point base device)"
    if not fixed and not auto:
        why["calibration_samples"] = "calibration sets fixed-point scales and auto gains, and no row has either"
    if not any(p.format == "abfp" for p in points):
        why["no_fixed"] = "the base device is fixed point: its rows are the grid, there is no separate baseline"
    if not noisy:
        for name in ("runs", "seed", "noise_dist"):
            why[name] = "every row is noise-free (noise 0): one run each, no noise to seed or shape"
    refuse_inapplicable(args, why)
    seeds = {p.config.seed for p in points if p.config is not None} - {None}
    if args.seed is not None and seeds and seeds != {args.seed}:
        raise UsageError(f"--seed {args.seed} and the device's own seed {min(seeds)} (execution.seed): give one")
    args.fixed_percentile = 100.0 if args.fixed_percentile is None else args.fixed_percentile
    args.calibration_samples = 256 if args.calibration_samples is None else args.calibration_samples
    args.seed = 0 if args.seed is None else args.seed


def _with_configs(records: list[dict[str, Any]], points: Sequence[Any]) -> list[dict[str, Any]]:
    """Each record with ``config``: the whole device it was simulated on (None for float32).

    The runner returns one record per point, in the order of ``points`` (float32 first)."""
    device_points = [p for p in points if p.config is not None]
    device_records = [r for r in records if r.get("format") != "fp32"]
    if len(device_points) != len(device_records) or any(
            r.get("label") != p.label() for r, p in zip(device_records, device_points)):
        raise RuntimeError("abfp eval: the runner's records do not follow the grid's points")
    configs = iter(p.config.to_dict(execution=True) for p in device_points)
    return [{**r, "config": None if r.get("format") == "fp32" else next(configs)} for r in records]


def _with_plan(records: list[dict[str, Any]], plan: Any, path: str) -> list[dict[str, Any]]:
    """The device records of ``abfp eval --plan``, marked as the plan they ran (``gain``:
    ``"plan"``, ``gains`` and ``repeats`` per module, ``plan_file``, ``plan_modules``: each
    module's whole config), not as the single-gain base device the table would otherwise show."""
    gains = {m: c.gain for m, c in plan.modules.items()}
    repeats = {m: c.repeats for m, c in plan.modules.items()}
    modules = {m: c.to_dict(execution=True) for m, c in plan.modules.items()}
    out = []
    for r in records:
        if r.get("format") != "fp32" and plan.modules:
            r = {**r, "gain": "plan", "gains": gains, "repeats": repeats, "plan_file": str(path),
                 "plan_modules": modules, "label": f"plan {Path(path).name} (base {r['label']})"}
        out.append(r)
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from . import zoo
    from .evaluate import EvalSettings, evaluate, format_table
    from .evaluate.runner import coverage_line
    from .evaluate.cache import CACHE_FILE

    _validate_eval(args)
    plan, weights = _plan_args(args)
    points, runs = eval_points(args)
    if plan is not None:
        from .evaluate.grid import Point

        points = [Point("fp32"), Point("abfp", plan.base)]
    calibration_given = args.calibration_samples is not None
    _refuse_inapplicable_eval(args, points, plan)
    device = resolve_device(args.device)
    apply_threads(args.threads)
    json_out = check_output_args(args, {"json_path": "--json"})
    if args.cache_dir:  # a resumable cache: it may exist, but must be (or become) a writable folder
        check_output_dir(args.cache_dir, what="--cache-dir")
    if args.paper and args.tasks is None:
        args.tasks = ["all"]
    from .evaluate.distributed import init_from_env, shutdown

    rank, _ = init_from_env(device)
    show = print if rank == 0 else (lambda *a, **k: None)
    if args.tasks is None and args.samples is None:
        # the embedded default: a quick look (about two minutes on 2 cores); the docs give
        # the full test set
        args.samples = DEFAULT_SAMPLES
        show(f"embedded default: fashion-cnn on the first {DEFAULT_SAMPLES} test images "
             "(--samples 10000 for the whole test set, --task for other models)")
    tasks = resolve_tasks(args.tasks)
    all_records = []
    for task in tasks:
        samples = args.samples if args.samples is not None else task.default_samples
        cache = None
        if args.cache_dir:
            cache = str(Path(args.cache_dir) / CACHE_FILE)  # one database, keyed on model, data, metric, config
        t0 = time.perf_counter()
        model = task.build_model()
        if plan is None and weights is not None:  # e.g. abfp finetune --save-model's: evaluated on any grid
            _load_weights(model, weights)
        if plan is not None:
            _plan_weights(model, plan, args.plan, weights)
            try:  # before the float32 pass: a plan that does not apply is refused before any work
                plan.check(model)
            except ValueError as e:
                raise UsageError(f"--plan {args.plan}: {e}") from None
        # fixed-point scales and auto gains come from the task's calibration split when it has one
        # (never from the evaluated inputs: EfficientNet-Lite0's calibration photos, MiniLM's sentences)
        needs_calibration = any(p.format == "fixed" or p.auto_gain for p in points if p.format != "fp32")
        calibration = task.load_calibration() if needs_calibration and task.load_calibration is not None else None
        data = task.load_data()
        note_evaluated(task.name, len(data), args.samples, task.default_samples,
                       args.calibration_samples if calibration_given and needs_calibration else None,
                       None if calibration is None else len(calibration), quiet=rank != 0)
        recs = evaluate(
            model, data, task.metric, points, task_name=task.name,
            overrides=plan.overrides() if plan is not None else None, calibration=calibration,
            settings=EvalSettings(runs=runs, batch_size=args.batch_size or task.default_batch_size, samples=samples,
                                  device=device, seed=args.seed, fixed_percentile=args.fixed_percentile,
                                  calibration_samples=args.calibration_samples,
                                  progress=not args.no_progress, cache_path=cache,
                                  extra_metrics=tuple(zoo.extra_metrics(task.name))),
        )
        recs = _with_configs(recs, points)
        if plan is not None:
            recs = _with_plan(recs, plan, args.plan)
            note = _plan_data_note(plan, args.plan)
            if note:
                show(note)
        show(format_table(recs))
        show(f"  {coverage_line(recs)}  ({time.perf_counter() - t0:.1f} s)\n")
        all_records.extend(recs)
    if json_out and rank == 0:
        atomic_write_text(json_out[0], json.dumps(all_records, indent=1, sort_keys=True) + "\n")
        show(f"wrote {len(all_records)} records to {json_out[0]}")
    shutdown()
    return 0


def _plan_data_note(plan: Any, path: str) -> str | None:
    """A note when ``plan`` was tuned on the first samples of the task's data (a task with no
    calibration split): this evaluation starts at sample 0 and includes them, while ``abfp
    tune``'s stage metrics were measured on the samples after them, so the two numbers differ."""
    info = plan.info or {}
    n = info.get("calibration_samples")
    if not n or not str(info.get("calibration_source", "")).startswith("the first samples"):
        return None
    return (f"note: {Path(path).name} was tuned on the first {n} samples of this task's data (it has no "
            f"calibration split), which this evaluation includes; abfp tune's stage metrics were measured on "
            f"the {info.get('eval_samples', '?')} samples after them")


def _plan_args(args: argparse.Namespace) -> tuple[Any, Path | None]:
    """``--plan`` (a DevicePlan) and ``--weights``, checked before any work."""
    if args.plan is None:
        return None, _weights_arg(args)
    clash = [flag for attr, flag in (("tile_widths", "--tile-widths"), ("gains", "--gains"), ("bits", "--bits"),
                                     ("noise", "--noise"), ("noise_dist", "--noise-dist"), ("preset", "--preset"),
                                     ("config", "--config")) if getattr(args, attr) is not None]
    if args.paper:
        clash.append("--paper")
    if clash:
        raise UsageError(f"--plan sets the device; drop {', '.join(clash)}")
    path = Path(args.plan)
    plan = load_plan_arg(args.plan)
    if plan.exclude:
        raise UsageError(f"--plan {path}: plans with excluded modules are not evaluated by abfp eval")
    fixed = [name for name, cfg in plan.modules.items() if cfg.mode != "abfp"]
    if plan.base.mode != "abfp" or fixed:
        where = "its base device" if plan.base.mode != "abfp" else f"the device of module {fixed[0]!r}"
        raise UsageError(f"--plan {path}: {where} is in mode 'fixed'; abfp eval --plan evaluates "
                         "ABFP plans (fixed-point points need calibrated scales, which a plan does not carry)")
    args.no_fixed = True
    return plan, _weights_arg(args)


def _weights_arg(args: argparse.Namespace) -> Path | None:
    """``--weights`` as a path to an existing file (one model's weights: one ``--task``)."""
    if args.weights is None:
        return None
    if args.tasks is not None and (len(args.tasks) != 1 or args.tasks[0] == "all"):
        raise UsageError("--weights holds one model's weights: give one --task")
    weights = Path(args.weights)
    if not weights.is_file():
        raise UsageError(f"--weights: no such file: {weights}")
    return weights


def _plan_weights(model: Any, plan: Any, plan_path: str, path: Path | None) -> None:
    """Check that ``plan`` (read from ``plan_path``) was tuned for ``model``'s architecture, then
    load the safetensors ``path`` (when given) into it, refused if written for another architecture
    (:mod:`abfp.tune.provenance`; every key must match)."""
    from .tune.provenance import check_plan_architecture, tuned_weights_differ

    try:
        check_plan_architecture(plan.info, model, f"--plan {plan_path}")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if path is None:
        if tuned_weights_differ(model.state_dict(), plan.info):
            # a finetuned plan evaluated without its weights, or a task whose make() builds another model at
            # every call (unseeded initialisation): the plan's numbers were not measured on this model
            name = plan.info["weights"].get("file", "the .safetensors file abfp tune wrote beside it")
            print(f"note: --plan {plan_path}: this model's weights are not the ones the plan was tuned with (digest "
                  f"differs): --weights {name} gives those; a task that builds its model without a seed differs at "
                  "every call", file=sys.stderr)
        return
    _load_weights(model, path, plan.info)


def _load_weights(model: Any, path: Path, plan_info: Any = None) -> None:
    """Load the safetensors ``path`` into ``model`` (:func:`abfp.tune.provenance.load_weights`: every key
    must match, another architecture is refused), a bad file being a usage error."""
    from .tune.provenance import load_weights

    try:
        note = load_weights(model, path, plan_info)["note"]
    except ValueError as e:
        raise UsageError(f"--weights {path}: {e}") from None
    if note:
        print(f"note: --weights {path}: {note}", file=sys.stderr)


# ------------------------------------------------------------------------------ report
def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="Markdown/HTML report with plots from an eval or explore JSON")
    p.add_argument("json_path", help="records written by 'abfp eval --json', or 'abfp explore --json' output")
    p.add_argument("--out", default="abfp-report", help="output folder (report.md or report.html plus PNGs)")
    p.add_argument("--html", action="store_true", help="write HTML instead of Markdown")
    add_force_option(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from .evaluate.report import report_files, validate_records, write_report

    path = Path(args.json_path)
    if not path.is_file():
        raise UsageError(f"no such file: {path}" if not path.exists() else f"{path} is a folder, not an eval JSON")
    from .explore.report import explore_report_files, is_explore_result, validate_explore, write_explore_report

    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        explored = is_explore_result(obj)  # written by 'abfp explore --json'
        records = validate_explore(obj) if explored else validate_records(obj)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    except ValueError as e:
        kind = json_kind(obj)
        if kind is not None and "abfp report" not in kind[1]:
            raise UsageError(f"{path} is {kind[0]}, not eval records or an explore result: {kind[1]}") from None
        raise UsageError(f"{path}: {e}") from None
    files = explore_report_files(html=args.html) if explored else report_files(records, html=args.html)
    check_output_dir(args.out, files, force=args.force, what="--out")
    refuse_overwriting_inputs(args, {Path(args.out) / n: "--out" for n in files}, {path: "input JSON"})
    check_plotting()
    if explored:
        print(f"wrote {write_explore_report(records, args.out, html=args.html)}")
        return 0
    out = write_report(records, args.out, html=args.html)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------ microbench
def _micro_parser(sub) -> None:
    p = sub.add_parser("microbench", help="the authors' micro-benchmark: element-wise error vs tile width and gain")
    p.add_argument("--out", default="abfp-microbench", help="output folder for the table, JSON and plot")
    p.add_argument("--tile-widths", type=csv_list(int, "--tile-widths"), default=[8, 32, 128])
    p.add_argument("--gains", type=csv_list(float, "--gains"), default=[1, 2, 4, 8, 16])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="leading batch of X (the authors: 16x25x768)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_force_option(p)
    p.set_defaults(func=cmd_micro)


def cmd_micro(args: argparse.Namespace) -> int:
    from .evaluate.microbench import OUTPUT_FILES, run_microbench

    require_at_least(args, ("batch", "threads"))
    for n in args.tile_widths:
        if not 1 <= n <= 1 << 20:
            raise UsageError(f"--tile-widths: {n} is not an integer in [1, 1048576]")
    for g in args.gains:
        if not (math.isfinite(g) and g > 0):
            raise UsageError(f"--gains: {g} is not a finite number > 0")
    require_at_least(args, ("seed",), 0)
    check_output_dir(args.out, OUTPUT_FILES, force=args.force, what="--out")
    check_plotting()
    apply_threads(args.threads)
    table = run_microbench(args.out, tile_widths=args.tile_widths, gains=args.gains, seed=args.seed, batch=args.batch)
    print(table)
    print(f"\nwrote {args.out}/{', '.join(OUTPUT_FILES)}")
    return 0


# ------------------------------------------------------------------------------ small commands
def _summary_parser(sub) -> None:
    p = sub.add_parser("summary", help="per-layer table of a zoo model on one batch")
    p.add_argument("--task", default="fashion-cnn", help="one zoo task or path/tasks.py:make")
    p.add_argument("--preset", default=None, help="device config preset (default: the default config)")
    p.add_argument("--config", default=None, help="device config as a JSON file or string")
    p.add_argument("--plan", default=None,
                   help="tabulate a device plan (abfp tune --json): each module at its own gain and repeats")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_summary)


def cmd_summary(args: argparse.Namespace) -> int:
    from .nn import summary

    require_at_least(args, ("batch_size", "threads"))
    plan = device_plan_arg(args)
    cfg = plan.base if plan is not None else base_config(args)
    if plan is not None and args.task == "all":
        raise UsageError("--plan was tuned for one model: give one --task")
    apply_threads(args.threads)
    tasks = resolve_tasks([args.task])  # 'all': one table per installed zoo task
    for i, task in enumerate(tasks):
        data = task.load_data().take(args.batch_size)
        if len(tasks) > 1:
            print(("\n" if i else "") + f"{task.name} on {cfg.label()}")
        model = task.build_model()
        if plan is not None:  # converted with every module's own device; summary keeps it
            model = plan_model(plan, model, args.plan)
            print(f"{task.name} on plan {Path(args.plan).name} (base {cfg.label()})")
        print(summary(model, data.inputs, cfg))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name, cfg in presets().items():
        print(f"{name:<16} {cfg.label()}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from . import zoo

    for name in zoo.names():
        t = zoo._REGISTRY[name]
        status = "" if zoo.available(name) else "  (not installed: " + ", ".join(zoo.missing(name)) + ")"
        print(f"{name:<20} {t.metric.kind:<9} {t.description}{status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="abfp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    _report_parser(sub)
    _micro_parser(sub)
    _summary_parser(sub)
    sub.add_parser("presets", help="list named device configs").set_defaults(func=cmd_presets)
    sub.add_parser("zoo", help="list the model zoo").set_defaults(func=cmd_zoo)
    for module in _EXTRA_COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):  # that capability is not part of this build
                continue
            raise
        mod.register(sub)
    for name, parser in sub.choices.items():
        if name in WRITING_COMMANDS:
            add_force_option(parser)  # one rule: an existing output needs --force (idempotent)
    return ap


#: The commands that write files: each has ``--force`` and checks its outputs before any work.
WRITING_COMMANDS = ("eval", "report", "microbench", "finetune", "precision", "energy", "tune", "explore")


#: What an interrupted command keeps and how to continue it (Ctrl-C; exit status 130).
INTERRUPTED = {
    "eval": "finished runs are cached; rerun the same command to resume",
    "explore": "finished runs are cached; rerun the same command to resume",
    "tune": "finished stages are in the journal; rerun the same command with --resume to continue",
    "precision": "finished records are in the journal; rerun the same command with --resume to continue",
    "finetune": "rerun the same command with --resume to continue from the last checkpoint",
}


def interrupted_line(args: argparse.Namespace) -> str:
    """The one line printed when the command of ``args`` is interrupted: what was kept, how to
    continue (a cached command run with ``--cache-dir ''`` kept nothing)."""
    command = getattr(args, "command", None) or ""
    if getattr(args, "cache_dir", None) == "":
        return "abfp: interrupted (the cache is off (--cache-dir ''): nothing was kept)"
    return f"abfp: interrupted ({INTERRUPTED.get(command, 'nothing was written')})"


#: The line of a Ctrl-C before any command ran (while the command line is read; while torch is
#: imported it is ``abfp/__init__.py``'s, the same words)
NOTHING_WRITTEN = "abfp: interrupted (nothing was written)"


#: Modules with a ``register(subparsers)`` function that adds their subcommands.
_EXTRA_COMMAND_MODULES = ("abfp.finetune.cli", "abfp.precision.cli", "abfp.tune.cli", "abfp.explore.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``abfp``; returns the exit status (2 and one line on stderr for bad input, and for a NaN
    where a number must be: a metric that returns NaN, a finetuning loss that blows up).

    Errors of the command line itself (unknown option, a value of the wrong type) exit through
    argparse's ``SystemExit(2)``, also with one line."""
    try:
        args = build_parser().parse_args(argv)  # imports the tools' modules: Ctrl-C may come here too
    except KeyboardInterrupt:
        print(NOTHING_WRITTEN, file=sys.stderr)
        return 130
    keep_freed_memory()  # large tensors reuse the heap instead of fresh kernel pages (abfp.allocator)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, OSError, ImportError, TypeError, FloatingPointError) as e:
        print_error(e)
        return 2
    except KeyboardInterrupt:
        print(interrupted_line(args), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
