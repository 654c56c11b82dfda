"""``abfp explore``: the command line of the device explorer (registered by :mod:`abfp.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..cli_common import (
    UsageError,
    add_force_option,
    apply_threads,
    base_config,
    check_output_args,
    check_output_dir,
    csv_list,
    load_json_arg,
    note_evaluated,
    note_fewer,
    refuse_inapplicable,
    refuse_overwriting_inputs,
    require_at_least,
    require_finite,
    resolve_device,
    single_task,
)
from ..outputs import atomic_write_text
from ..plotting import check_plotting

__all__ = ["register", "cmd_explore"]


def _range(text: str) -> tuple[int, int]:
    """``"2,16"`` or ``"2:16"`` -> (2, 16)."""
    parts = text.replace(":", ",").split(",")
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--adc-bits: {text!r} is not LO,HI (two integers, e.g. 2,16)") from None
    return lo, hi


def _parser(sub: Any) -> None:
    p = sub.add_parser(
        "explore", help="design the device: the cheapest tile width, converter bits and gain meeting a target",
        description="For one model and a fidelity target (float32 minus --target-drop percent, or --target), "
                    "search fixed point and ABFP at each tile width: ADC bits by bisection (each gain of the "
                    "ladder, and auto per-layer gain), then the DAC bits of each family's cheapest design; energy "
                    "per inference from abfp.energy. Runs are cached like 'abfp eval' (a rerun resumes).")
    p.add_argument("--task", "--model", dest="task", default="fashion-cnn",
                   help="zoo task name or pkg.module:function / path/tasks.py:function (default: fashion-cnn)")
    p.add_argument("--target-drop", type=float, default=None,
                   help="target: float32 metric minus this percent of it (default 1: within 1%% of float32)")
    p.add_argument("--target", type=float, default=None, help="target: an absolute metric value instead")
    p.add_argument("--formats", type=csv_list(str, "--formats"), default=["fixed", "abfp"],
                   help="comma list of fixed, abfp (default both)")
    p.add_argument("--tile-widths", type=csv_list(int, "--tile-widths"), default=[8, 32, 128],
                   help="comma list of tile widths n (default 8,32,128)")
    p.add_argument("--gains", type=csv_list(str, "--gains"), default=None,
                   help="ABFP gain ladder; 'auto' adds a per-layer-gain family (default 1,2,4,8,16,auto)")
    p.add_argument("--fixed-gains", type=csv_list(float, "--fixed-gains"), default=None,
                   help="fixed-point gain ladder (default 1, the authors' baseline)")
    p.add_argument("--adc-bits", type=_range, default=(2, 16), help="ADC bits searched, LO,HI (default 2,16)")
    p.add_argument("--dac-min-bits", type=int, default=None, help="fewest DAC bits tried (default 2)")
    p.add_argument("--dac-search", choices=["joint", "separate", "none"], default="joint",
                   help="DAC bits of each family's cheapest design: both DACs together (default), inputs then "
                        "weights, or none")
    p.add_argument("--dac-max-bits", type=int, default=None,
                   help="when no design of a family meets the target at the base DAC bits, even at the highest ADC "
                        "bits, raise both DACs by bisection up to this many bits (default: never)")
    p.add_argument("--screen", type=int, default=None, metavar="K",
                   help="evaluate every design first on K of the samples, spread evenly over them (one run); one missing the target there "
                        "by --screen-z standard errors is not evaluated on all samples; a design with at least the bits of one "
                        "that passed the screen skips it (default: no screen)")
    p.add_argument("--screen-z", type=float, default=None, help="standard errors of the screen's rejection (default 3)")
    p.add_argument("--noise", type=csv_list(float, "--noise"), default=None,
                   help="device noise std in ADC LSBs; a comma list sweeps it (default: the base device's, one bin "
                        "wide: 0.2887)")
    p.add_argument("--no-prune", action="store_true", help="bisect every gain over the whole ADC range")
    p.add_argument("--global-prune", action="store_true",
                   help="skip every design costing at least as much energy as one already known to meet the target "
                        "(families searched cheapest first; a dominated family may report no design of its own)")
    p.add_argument("--early-stop", type=float, default=None, metavar="Z",
                   help="stop averaging a noisy design's runs once its mean is Z standard errors from the target, "
                        "or once the remaining runs cannot move it across the target (a percentage lies in 0..100) "
                        "(e.g. 3; default: every design runs --runs times)")
    p.add_argument("--runs", type=int, default=None, help="runs per noisy design (mean and std; default 3)")
    p.add_argument("--samples", type=int, default=None, help="evaluate the first N samples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's own")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="calibration inputs (the task's calibration split, else the first evaluated ones) that set "
                        "fixed-point scales and auto gains: min(N, samples evaluated) (default 256); auto gain runs "
                        "them 9 times per tile width, so a few dozen make a search much cheaper")
    p.add_argument("--energy-samples", type=int, default=1,
                   help="inputs accounted together for energy (weights converted once per call); default 1")
    p.add_argument("--params", default=None, help="energy per event (EnergyParams) as a JSON file or string")
    p.add_argument("--preset", default=None, help="base device (DAC/ADC bits, noise, options) as a preset; "
                                                  "the search sets its format, tile width and gain")
    p.add_argument("--config", default=None, help="base device as a JSON file or string (its mode, tile_width and "
                                                  "gain, when named, must be among --formats, --tile-widths and "
                                                  "the gain ladders: the search sets them)")
    p.add_argument("--fixed-percentile", type=float, default=None,
                   help="percentile of |activation| used as the fixed-point static scale (default 100: the max)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N, mps")
    p.add_argument("--seed", type=int, default=None, help="seed of the device noise (run r: seed + r; default 0)")
    p.add_argument("--json", dest="json_path", default=None, help="write the result as one JSON object")
    p.add_argument("--out", default=None, help="write a report folder (explore.md, pareto.png)")
    p.add_argument("--html", action="store_true", help="with --out: explore.html instead of explore.md")
    p.add_argument("--cache-dir", default=".abfp_cache", help="resumable cache of finished runs ('' disables)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    add_force_option(p)
    p.set_defaults(func=cmd_explore)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Every option checked and turned into :func:`abfp.explore` keyword arguments (UsageError if bad)."""
    from ..energy import EnergyParams
    from ..evaluate.grid import parse_gain
    from .search import SearchSpace
    from .target import Target

    require_at_least(args, ("runs", "samples", "batch_size", "threads", "energy_samples", "calibration_samples"))
    require_at_least(args, ("seed",), 0)
    require_finite(args, ("target_drop", "target", "fixed_percentile", "early_stop", "screen_z"))
    if args.target is not None and args.target_drop is not None:
        raise UsageError("give --target or --target-drop, not both")
    if args.fixed_percentile is not None and not 0 < args.fixed_percentile <= 100:
        raise UsageError(f"--fixed-percentile must be in (0, 100], got {args.fixed_percentile}")
    base = base_config(args)
    noise = args.noise if args.noise is not None else [base.noise_std]
    if args.seed is not None and base.seed is not None and args.seed != base.seed:
        raise UsageError(f"--seed {args.seed} and the device's own seed {base.seed} (execution.seed): give one")
    _refuse_inapplicable_explore(args, noise)
    try:
        gains = [parse_gain(g) for g in args.gains]
        target = (Target(drop_percent=None, absolute=args.target) if args.target is not None
                  else Target(drop_percent=1.0 if args.target_drop is None else args.target_drop))
        space = SearchSpace(formats=tuple(args.formats), tile_widths=tuple(args.tile_widths),
                            gains=tuple(float(g) for g in gains if g != "auto"), auto_gain="auto" in gains,
                            fixed_gains=tuple(args.fixed_gains), adc_bits=tuple(args.adc_bits),
                            dac_min_bits=args.dac_min_bits, dac_search=args.dac_search,
                            dac_max_bits=args.dac_max_bits, screen=args.screen, screen_z=args.screen_z,
                            noise_stds=tuple(noise),
                            prune=not args.no_prune, global_prune=args.global_prune, early_stop=args.early_stop)
        # every design the search may visit must be a valid device: refuse a bad one now, not mid-search
        for n in space.tile_widths:
            for b in (space.adc_bits[0], space.adc_bits[1]):
                base.replace(tile_width=n, output_bits=b)
            base.replace(tile_width=n, input_bits=space.dac_min_bits, weight_bits=space.dac_min_bits)
            if space.dac_max_bits is not None:
                base.replace(tile_width=n, input_bits=space.dac_max_bits, weight_bits=space.dac_max_bits,
                             output_bits=space.adc_bits[1])
        params = EnergyParams.from_dict(load_json_arg(args.params, "--params")) if args.params else EnergyParams()
    except ValueError as e:
        raise UsageError(str(e)) from None
    _check_base_is_searched(args, base, space)
    if args.dac_min_bits > max(base.input_bits, base.weight_bits):
        raise UsageError(f"--dac-min-bits {args.dac_min_bits} exceeds the base device's DAC bits "
                         f"{base.input_bits}/{base.weight_bits}")
    if args.dac_max_bits is not None and args.dac_max_bits < max(base.input_bits, base.weight_bits):
        raise UsageError(f"--dac-max-bits {args.dac_max_bits} is below the base device's DAC bits "
                         f"{base.input_bits}/{base.weight_bits}")
    return {"base": base, "target": target, "space": space, "params": params}


#: The defaults of the options that are refused where they do not apply (None on the parser).
_DEFAULTS = {"gains": ["1", "2", "4", "8", "16", "auto"], "fixed_gains": [1.0], "dac_min_bits": 2, "screen_z": 3.0,
             "runs": 3, "calibration_samples": 256, "fixed_percentile": 100.0, "seed": 0}


def _refuse_inapplicable_explore(args: argparse.Namespace, noise: list[float]) -> None:
    """Options that would change nothing in this search are refused; the others get their defaults."""
    formats = list(args.formats)
    auto = "abfp" in formats and "auto" in [str(g).strip().lower() for g in (args.gains or _DEFAULTS["gains"])]
    why: dict[str, str] = {}
    if args.out is None:
        why["html"] = "it chooses the format of the --out report, and no --out is given"
    if "abfp" not in formats:
        why["gains"] = "no ABFP family is searched (--formats)"
    if "fixed" not in formats:
        why["fixed_gains"] = why["fixed_percentile"] = "no fixed-point family is searched (--formats)"
    if "fixed" not in formats and not auto:
        why["calibration_samples"] = "calibration sets fixed-point scales and auto gains, and no family has either"
    if args.screen is None:
        why["screen_z"] = "it sets the rejection of --screen, and no screen is run"
    if args.dac_search == "none":
        why["dac_min_bits"] = "no DAC bits are searched (--dac-search none)"
    if not any(z > 0 for z in noise):
        why["runs"] = why["early_stop"] = why["seed"] = "every design is noise-free (noise 0): one run each"
    refuse_inapplicable(args, why)
    for name, default in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _check_base_is_searched(args: argparse.Namespace, base: Any, space: Any) -> None:
    """A ``--config`` that names the mode, tile width or gain the search itself sets must name one it
    searches: any other value would be silently replaced by the search's."""
    if args.config is None:
        return
    named = load_json_arg(args.config, "--config")
    ladder = [*space.gains, *space.fixed_gains]
    for field, value, searched, option in (("mode", base.mode, list(space.formats), "--formats"),
                                           ("tile_width", base.tile_width, list(space.tile_widths), "--tile-widths"),
                                           ("gain", base.gain, ladder, "--gains / --fixed-gains")):
        if isinstance(named, dict) and field in named and value not in searched:
            raise UsageError(f"--config: {field} {value!r} is not searched ({option} "
                             f"{','.join(str(v) for v in searched)}); explore sets the {field} of every design: "
                             f"add it to {option.split(' ')[0]} or drop it from --config")


def cmd_explore(args: argparse.Namespace) -> int:
    from ..evaluate.cache import CACHE_FILE
    from ..evaluate.distributed import init_from_env, shutdown
    from ..evaluate.runner import EvalSettings
    from .report import explore_report_files, format_explore_table, write_explore_report
    from .api import task_calibration
    from .search import explore_model

    calibration_given = args.calibration_samples is not None
    opts = _options(args)
    device = resolve_device(args.device)
    apply_threads(args.threads)
    json_out = check_output_args(args, {"json_path": "--json"})
    if args.out is not None:
        check_output_dir(args.out, explore_report_files(html=args.html), force=args.force, what="--out")
        refuse_overwriting_inputs(args, {Path(args.out) / n: "--out" for n in explore_report_files(html=args.html)})
        check_plotting()
    if args.cache_dir:
        check_output_dir(args.cache_dir, what="--cache-dir")
    task = single_task(args.task, "explore")
    rank, _ = init_from_env(device)
    show = print if rank == 0 else (lambda *a, **k: None)
    samples = args.samples if args.samples is not None else task.default_samples
    data, calibration = task.load_data(), task_calibration(task, opts["space"])
    space = opts["space"]
    evaluated = note_evaluated(task.name, len(data), args.samples, task.default_samples,
                               args.calibration_samples if calibration_given else None,
                               None if calibration is None else len(calibration), quiet=rank != 0)
    note_fewer("--energy-samples", args.energy_samples, evaluated, "samples evaluated", quiet=rank != 0)
    if space.screen is not None and space.screen >= evaluated and rank == 0:
        print(f"abfp: note: --screen {space.screen} is not fewer than the {evaluated} samples evaluated: no screen, "
              "every design is evaluated on all of them", file=sys.stderr)
    settings = EvalSettings(runs=args.runs, batch_size=args.batch_size or task.default_batch_size, samples=samples,
                            device=device, seed=args.seed, fixed_percentile=args.fixed_percentile,
                            calibration_samples=args.calibration_samples,
                            cache_path=str(Path(args.cache_dir) / CACHE_FILE) if args.cache_dir else None)
    t0 = time.perf_counter()
    try:
        result = explore_model(task.build_model(), data, task.metric, task_name=task.name,
                               target=opts["target"], space=opts["space"], base=opts["base"],
                               energy_params=opts["params"], energy_samples=args.energy_samples, settings=settings,
                               progress=not args.no_progress,
                               calibration=calibration)
        show(format_explore_table(result))
        show(f"  ({time.perf_counter() - t0:.1f} s, {result['evaluations']} designs evaluated)")
        if rank == 0:
            if json_out:
                atomic_write_text(json_out[0], json.dumps(result, indent=1, sort_keys=True) + "\n")
                show(f"wrote {json_out[0]}")
            if args.out is not None:
                show(f"wrote {write_explore_report(result, args.out, html=args.html)}")
    finally:
        shutdown()
    return 0


def register(sub: Any) -> None:
    """Add the ``explore`` subcommand."""
    _parser(sub)

