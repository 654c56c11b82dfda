"""``abfp precision`` and ``abfp energy`` (registered by :func:`abfp.cli.build_parser`).

    abfp precision --task fashion-cnn --noise shot --json out/cnn_shot.json
    abfp precision --task fashion-vit --noise thermal --per-channel --target-drop 1 --json vit.json
    abfp energy --task fashion-cnn --preset default
    abfp energy --task fashion-vit --config cfg.json --params energy.json --json energy.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..cli_common import (
    UsageError,
    add_force_option,
    apply_threads,
    base_config,
    check_journal,
    check_output_args,
    device_plan_arg,
    load_json_arg,
    note_fewer,
    plan_model,
    refuse_inapplicable,
    require_at_least,
    require_finite,
    single_task,
)
from ..journal import JournalMismatch, remove_journal
from ..outputs import atomic_write_text
from ..plotting import check_plotting

#: The noise types of ``--noise`` (abfp.noise.NOISE_NAMES; not imported here to keep ``abfp`` start-up light).
NOISE_CHOICES = ("shot", "thermal", "weight")


# ------------------------------------------------------------------------------ precision
def _precision_parser(sub) -> None:
    p = sub.add_parser("precision", help="learn the energy (precision) per layer under shot/thermal/weight noise",
                       description="Uniform energy per MAC versus a learned per-layer (or per-channel) allocation at "
                                   "equal accuracy (SPEC section 5).")
    p.add_argument("--task", default="fashion-cnn", help="zoo task (default fashion-cnn)")
    p.add_argument("--noise", choices=NOISE_CHOICES, default="shot")
    p.add_argument("--per-channel", action="store_true", help="one energy per output channel instead of per layer")
    p.add_argument("--target-drop", type=float, default=None, help="target = float32 metric minus this (default 2)")
    p.add_argument("--target", type=float, default=None, help="absolute target metric (instead of --target-drop)")
    p.add_argument("--steps", type=int, default=300, help="learning steps (batches), default 300")
    p.add_argument("--batch-size", type=int, default=128, help="learning batch size (default 128)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate on log E (default 0.01)")
    p.add_argument("--lam", type=float, default=None, help="penalty weight (default: shot 2, thermal 6, weight 8)")
    p.add_argument("--learn-ratio", type=float, default=1.0,
                   help="E_target of learning as a multiple of the uniform energy (default 1)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="evaluate on the first N evaluation samples (default all; a task without a training split "
                        "learns on the first half of its data and is evaluated on the rest)")
    p.add_argument("--rel-tol", type=float, default=0.02, help="relative tolerance of the energy searches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search-seeds", type=int, default=1,
                   help="noise seeds averaged at every energy of the searches (default 1)")
    p.add_argument("--aj-per-photon", type=float, default=None,
                   help="attojoules per photon, for --noise shot (default 0.128, at 1550 nm)")
    p.add_argument("--json", dest="json_path", default=None, help="write the result as JSON")
    p.add_argument("--plot", default=None, help="PNG of per-layer E and b_eff (default: next to --json)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress lines (--no-progress as in the other commands)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its journal (<json stem>.journal.json beside --json, else "
                        ".abfp_precision/<task>-<noise>.journal.json): finished evaluations and the learned energies "
                        "are not recomputed; refused when the journal was written by a run with other settings, "
                        "model or data")
    add_force_option(p)
    p.set_defaults(func=cmd_precision)


def journal_path(args: argparse.Namespace) -> Path:
    """Where ``abfp precision`` keeps its journal (see ``--resume``)."""
    if args.json_path:
        return Path(args.json_path).with_name(Path(args.json_path).stem + ".journal.json")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{args.task}-{args.noise}{'-per-channel' if args.per_channel else ''}")
    return Path(".abfp_precision") / f"{name}.journal.json"


def _plot_path(args: argparse.Namespace) -> str | None:
    """``--plot``, else a PNG beside ``--json``, else none."""
    return args.plot or (str(Path(args.json_path).with_suffix(".png")) if args.json_path else None)


def cmd_precision(args: argparse.Namespace) -> int:
    from .experiment import PrecisionSettings, plot_precision, run_precision, summarize

    require_finite(args, ("target_drop", "lr", "lam", "learn_ratio", "rel_tol", "aj_per_photon", "target"))
    if args.target is not None and args.target_drop is not None:
        raise UsageError("give --target or --target-drop, not both")
    refuse_inapplicable(args, {} if args.noise == "shot" else {
        "aj_per_photon": f"--noise {args.noise} energies are not photons (it converts shot noise's photons per MAC)"})
    args.target_drop = 2.0 if args.target_drop is None else args.target_drop
    args.aj_per_photon = 0.128 if args.aj_per_photon is None else args.aj_per_photon
    if args.target_drop < 0:
        raise UsageError("--target-drop must be >= 0")
    require_at_least(args, ("steps", "batch_size", "eval_samples", "threads", "search_seeds"))
    require_at_least(args, ("seed",), 0)
    if args.lr <= 0 or args.learn_ratio <= 0 or args.rel_tol <= 0 or args.aj_per_photon <= 0:
        raise UsageError("--lr, --learn-ratio, --rel-tol and --aj-per-photon must be > 0")
    if args.lam is not None and args.lam < 0:
        raise UsageError("--lam must be >= 0")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError("--plot must name a .png file")
    args.plot = _plot_path(args)
    json_path, plot = (args.json_path, args.plot)
    journal = journal_path(args)
    resuming = check_journal(journal, args)  # a resumed run may replace its own outputs
    check_output_args(argparse.Namespace(**{**vars(args), "force": args.force or resuming}),
                      {"json_path": "--json", "plot": "--plot"})
    if plot:
        check_plotting()
    task = single_task(args.task, "precision")
    apply_threads(args.threads)
    if args.eval_samples is not None or args.batch_size != 128:  # given: said when beyond the data
        from .experiment import precision_data

        evald, train, source = precision_data(task)
        note_fewer("--eval-samples", args.eval_samples, len(evald), f"evaluation samples in {task.name}'s data")
        if args.batch_size != 128:  # a batch beyond the learning data is all of it (learn.shuffled_batches)
            note_fewer("--batch-size", args.batch_size, len(train), f"learning samples ({source})")
    settings = PrecisionSettings(
        noise=args.noise, per_channel=args.per_channel, target_drop=args.target_drop, target=args.target,
        lam=args.lam, lr=args.lr, steps=args.steps, batch_size=args.batch_size, learn_ratio=args.learn_ratio,
        eval_samples=args.eval_samples, seed=args.seed, search_seeds=args.search_seeds, rel_tol=args.rel_tol,
        aj_per_photon=args.aj_per_photon,
    )
    try:
        result = run_precision(task, settings, progress=None if args.quiet else print, journal=journal,
                               resume=args.resume)
    except JournalMismatch as e:
        raise UsageError(f"--resume: {e}") from None
    print(summarize(result))
    if json_path:
        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_path}")
    if plot:
        plot_precision(result, plot)
        print(f"wrote {plot}")
    remove_journal(journal, ("learned.safetensors",))  # the outputs are written: nothing left to resume
    return 0


# ------------------------------------------------------------------------------ energy
def _energy_parser(sub) -> None:
    p = sub.add_parser("energy", help="energy and operation counts of a zoo model on the ABFP device",
                       description="Per-layer MACs, DAC/ADC conversions, digital operations and energies "
                                   "(SPEC section 6).")
    p.add_argument("--task", default="fashion-cnn")
    p.add_argument("--preset", default=None, help="device config preset (default: the default config)")
    p.add_argument("--config", default=None, help="device config as a JSON file or string")
    p.add_argument("--params", default=None, help="energy per event (EnergyParams) as a JSON file or string")
    p.add_argument("--plan", default=None,
                   help="account a device plan (abfp tune --json): each module at its own gain and repeats")
    p.add_argument("--batch-size", type=int, default=1,
                   help="samples accounted together (weights are converted once per call); default 1")
    p.add_argument("--json", dest="json_path", default=None, help="write the report as JSON")
    add_force_option(p)
    p.set_defaults(func=cmd_energy)


def cmd_energy(args: argparse.Namespace) -> int:
    from ..energy import EnergyParams, account, authors_adc_comparison, unaccounted_settings

    require_at_least(args, ("batch_size",))
    plan = device_plan_arg(args)
    cfg = plan.base if plan is not None else base_config(args)
    unused = unaccounted_settings(cfg) if plan is None else []
    if unused:  # valid device settings that energy does not depend on: said, not silently dropped
        print(f"abfp: note: the device's {', '.join(unused)} change no energy or operation count: not used "
              "(noise is paid for through repeats)", file=sys.stderr)
    try:
        params = EnergyParams.from_dict(load_json_arg(args.params, "--params")) if args.params else EnergyParams()
    except ValueError as e:
        raise UsageError(f"--params: {e}") from None
    json_out = check_output_args(args, {"json_path": "--json"})
    task = single_task(args.task, "energy")
    data = task.load_data()
    data = data.take(note_fewer("--batch-size", args.batch_size, len(data), f"samples in {task.name}'s data"))
    model = task.build_model()
    if plan is not None:
        model = plan_model(plan, model, args.plan)
    report = account(model, data.inputs, cfg, params)
    print(f"{task.name} on {cfg.label()}" + (f", plan {Path(args.plan).name}" if plan is not None else ""))
    print(report)
    cmp_ = authors_adc_comparison(params)
    print(f"ADC energy per conversion, fixed point n=8 at 12.5 bits vs ABFP n=128, G=8, 8 bits: {cmp_.ratio:.2f}x; "
          f"per MAC {cmp_.per_mac_ratio:.1f}x")
    if json_out:
        out: dict[str, Any] = {"task": task.name, "config": cfg.to_dict(), **report.to_dict(),
                               **({"plan_file": str(args.plan)} if plan is not None else {}),
                               "authors_adc_comparison": {"ratio": cmp_.ratio, "per_mac_ratio": cmp_.per_mac_ratio}}
        atomic_write_text(json_out[0], json.dumps(out, indent=2) + "\n")
        print(f"wrote {json_out[0]}")
    return 0


def register(sub) -> None:
    """Add the ``precision`` and ``energy`` subcommands."""
    _precision_parser(sub)
    _energy_parser(sub)
