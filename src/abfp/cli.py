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
    abfp presets | abfp zoo
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .config import REFERENCE_NOISE_STD, ABFPConfig, presets


#: Samples of the embedded default run of ``abfp eval`` (no --task, no --samples).
DEFAULT_SAMPLES = 1000


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


def _csv(kind: type, name: str):
    def parse(s: str) -> list[Any]:
        out = []
        for part in s.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(kind(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name}: {part!r} is not a valid {kind.__name__}") from None
        if not out:
            raise argparse.ArgumentTypeError(f"{name}: empty list")
        return out
    return parse


def _base_config(args: argparse.Namespace) -> ABFPConfig:
    if getattr(args, "config", None):
        return ABFPConfig.from_json(args.config)
    if getattr(args, "preset", None):
        return ABFPConfig.preset(args.preset)
    return ABFPConfig()


# ------------------------------------------------------------------------------ eval
def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate zoo or user models on the device across a grid",
                       description="Evaluate models on the ABFP device against float32 and the fixed-point baseline.")
    p.add_argument("--task", "--model", dest="tasks", action="append", default=None,
                   help="zoo task name or package.module:function returning (model, data, metric); repeatable "
                        "(default: fashion-cnn). 'all' runs the whole zoo")
    p.add_argument("--tile-widths", type=_csv(int, "--tile-widths"), default=[8, 32, 128])
    p.add_argument("--gains", type=_csv(str, "--gains"), default=["1", "2", "4", "8", "16"],
                   help="comma list of gains; 'auto' picks a gain per layer from calibration data")
    p.add_argument("--bits", type=_csv(str, "--bits"), default=["8/8/8"], help="weights/inputs/ADC, e.g. 8/8/8,6/6/8")
    p.add_argument("--noise", type=_csv(float, "--noise"), default=[REFERENCE_NOISE_STD],
                   help="device noise std in ADC LSBs (default one bin wide: 0.2887); comma list sweeps")
    p.add_argument("--noise-dist", choices=["uniform", "gaussian"], default="uniform")
    p.add_argument("--runs", type=int, default=3, help="runs per noisy point (mean and std reported)")
    p.add_argument("--samples", type=int, default=None, help="evaluate the first N samples (default: the task's own)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fixed", action="store_true", help="skip the fixed-point baseline")
    p.add_argument("--fixed-percentile", type=float, default=100.0,
                   help="percentile of |activation| used as the fixed-point static scale (100: the max)")
    p.add_argument("--paper", action="store_true",
                   help="the authors' whole grid on the zoo: 6/6/8 and 8/8/8, n=8,32,128, G=1..16, 10 runs")
    p.add_argument("--json", dest="json_path", default=None, help="write the records as a JSON list")
    p.add_argument("--cache-dir", default=".abfp_cache", help="resumable cache of finished runs ('' disables)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--preset", default=None, help="base device config (bits/gain/... are then swept from it)")
    p.add_argument("--config", default=None, help="base device config as a JSON file or string")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def _resolve_tasks(names: Sequence[str] | None):
    from . import zoo

    names = list(names or ["fashion-cnn"])
    if names == ["all"]:
        names = [n for n in zoo.names() if zoo.available(n)]
    tasks = []
    for name in names:
        module, _, func = name.rpartition(":")
        if module.endswith(".py") or "/" in module:
            # a task defined in a file: path/to/tasks.py:make
            path = Path(module)
            if not path.is_file():
                raise UsageError(f"no such file: {path}")
            tasks.append(zoo.load_callable(f"{path}:{func}"))  # imported under a name unique to the file
        elif module:
            tasks.append(zoo.load_callable(name))
        else:
            tasks.append(zoo.get(name))
    return tasks


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from . import zoo
    from .evaluate import EvalSettings, build_grid, evaluate, format_table, parse_bits, parse_gain
    from .evaluate.cache import CACHE_FILE

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.runs < 1:
        raise UsageError("--runs must be >= 1")
    for n in args.tile_widths:
        if n < 1:
            raise UsageError(f"--tile-widths: {n} is not a positive integer")
    try:
        gains = [parse_gain(g) for g in args.gains]
        bits = [parse_bits(b) for b in args.bits]
        for w, x, y in bits:
            ABFPConfig(weight_bits=w, input_bits=x, output_bits=y)
        for ns in args.noise:
            ABFPConfig(noise_std=ns)
    except ValueError as e:
        raise UsageError(str(e)) from None
    runs = args.runs
    if args.paper:
        bits, gains, args.tile_widths, runs = [(6, 6, 8), (8, 8, 8)], [1.0, 2.0, 4.0, 8.0, 16.0], [8, 32, 128], 10
        if args.tasks is None:
            args.tasks = ["all"]
    base = _base_config(args).replace(noise_dist=args.noise_dist)
    points = build_grid(tile_widths=args.tile_widths, gains=gains, bits=bits, noise_stds=args.noise,
                        fixed=not args.no_fixed, base=base)
    from .evaluate.distributed import init_from_env, shutdown

    rank, _ = init_from_env(args.device)
    show = print if rank == 0 else (lambda *a, **k: None)
    if args.tasks is None and args.samples is None:
        # the embedded default: a quick look (about two minutes on 2 cores); the docs give
        # the full test set
        args.samples = DEFAULT_SAMPLES
        show(f"embedded default: fashion-cnn on the first {DEFAULT_SAMPLES} test images "
             "(--samples 10000 for the whole test set, --task for other models)")
    tasks = _resolve_tasks(args.tasks)
    all_records = []
    for task in tasks:
        samples = args.samples if args.samples is not None else task.default_samples
        cache = None
        if args.cache_dir:
            cache = str(Path(args.cache_dir) / CACHE_FILE)  # one database, keyed on model, data, metric, config
        t0 = time.perf_counter()
        recs = evaluate(
            task.build_model(), task.load_data(), task.metric, points, task_name=task.name,
            settings=EvalSettings(runs=runs, batch_size=args.batch_size or task.default_batch_size, samples=samples,
                                  device=args.device, seed=args.seed, fixed_percentile=args.fixed_percentile,
                                  progress=not args.no_progress, cache_path=cache,
                                  extra_metrics=tuple(zoo.extra_metrics(task.name))),
        )
        show(format_table(recs))
        show(f"  ({time.perf_counter() - t0:.1f} s)\n")
        all_records.extend(recs)
    if args.json_path and rank == 0:
        from .evaluate.cache import write_json_atomic

        write_json_atomic(args.json_path, all_records)
        show(f"wrote {len(all_records)} records to {args.json_path}")
    shutdown()
    return 0


# ------------------------------------------------------------------------------ report
def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="Markdown/HTML report with plots from an eval JSON")
    p.add_argument("json_path", help="records written by 'abfp eval --json'")
    p.add_argument("--out", default="abfp-report", help="output folder (report.md or report.html plus PNGs)")
    p.add_argument("--html", action="store_true", help="write HTML instead of Markdown")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from .evaluate.report import write_report

    path = Path(args.json_path)
    if not path.exists():
        raise UsageError(f"no such file: {path}")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    out = write_report(records, args.out, html=args.html)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------ microbench
def _micro_parser(sub) -> None:
    p = sub.add_parser("microbench", help="the authors' micro-benchmark: element-wise error vs tile width and gain")
    p.add_argument("--out", default="abfp-microbench", help="output folder for the table, JSON and plot")
    p.add_argument("--tile-widths", type=_csv(int, "--tile-widths"), default=[8, 32, 128])
    p.add_argument("--gains", type=_csv(float, "--gains"), default=[1, 2, 4, 8, 16])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="leading batch of X (the authors: 16x25x768)")
    p.set_defaults(func=cmd_micro)


def cmd_micro(args: argparse.Namespace) -> int:
    from .evaluate.microbench import run_microbench

    table = run_microbench(args.out, tile_widths=args.tile_widths, gains=args.gains, seed=args.seed, batch=args.batch)
    print(table)
    print(f"\nwrote {args.out}/microbench.md, microbench.json, microbench.png")
    return 0


# ------------------------------------------------------------------------------ small commands
def _summary_parser(sub) -> None:
    p = sub.add_parser("summary", help="per-layer table of a zoo model on one batch")
    p.add_argument("--task", default="fashion-cnn")
    p.add_argument("--preset", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_summary)


def cmd_summary(args: argparse.Namespace) -> int:
    from .nn import summary

    (task,) = _resolve_tasks([args.task])
    data = task.load_data().take(args.batch_size)
    print(summary(task.build_model(), data.inputs, _base_config(args)))
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
    ap = argparse.ArgumentParser(prog="abfp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return ap


#: Modules with a ``register(subparsers)`` function that adds their subcommands.
_EXTRA_COMMAND_MODULES = ("abfp.finetune.cli", "abfp.precision.cli")


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"abfp: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError, TypeError) as e:
        print(f"abfp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abfp: interrupted (finished runs are cached; rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
