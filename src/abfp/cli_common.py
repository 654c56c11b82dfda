"""Helpers shared by every ``abfp`` subcommand: argument types and validators, device-config
loading (``--preset`` / ``--config``), ``--threads`` / ``--device`` handling, output-path checks
and one-line error printing.

The rule for bad input, for every command: exit status 2 and ONE line on stderr that names the
option (or file) at fault, before any work starts. This module imports nothing from the command
modules (``abfp.cli``, ``abfp.finetune.cli``, ``abfp.precision.cli``), which all import it: no
import cycle. Heavy modules (torch, the zoo) are imported inside the functions that need them,
so ``abfp --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .config import ABFPConfig
from .outputs import OutputError, check_output, check_output_dir

__all__ = [
    "UsageError", "OneLineParser", "csv_list", "error_line", "print_error", "require", "require_at_least",
    "require_finite", "refuse_inapplicable", "load_json_arg", "device_plan_arg", "plan_model", "base_config",
    "apply_threads", "resolve_device", "resolve_tasks",
    "single_task", "add_force_option", "check_journal", "check_output_args", "check_output_dir", "OutputError",
    "INPUT_OPTIONS", "input_files", "refuse_overwriting_inputs", "json_kind",
]


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


def error_line(exc: BaseException | str) -> str:
    """``exc`` as one line (newlines folded, surrounding quotes of a bare KeyError removed)."""
    text = str(exc)
    if isinstance(exc, KeyError) and len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return " ".join(text.split()) or type(exc).__name__


def print_error(exc: BaseException | str) -> None:
    """Print ``abfp: error: <one line>`` to stderr; an error that came out of the user's own code
    (a task function, a model's ``forward``) ends with where: :func:`user_code_location`."""
    where = user_code_location(exc) if isinstance(exc, BaseException) else None
    suffix = f" ({type(exc).__name__} {where})" if where else ""
    print(f"abfp: error: {error_line(exc)}{suffix}", file=sys.stderr)


def _library_roots() -> tuple[str, ...]:
    """Folders whose code is not the user's: abfp itself, the standard library, installed packages."""
    import sysconfig

    roots = {str(Path(__file__).resolve().parent)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        with contextlib.suppress(KeyError):
            roots.add(str(Path(sysconfig.get_paths()[key]).resolve()))
    return tuple(r + os.sep for r in roots)


def user_code_location(exc: BaseException) -> str | None:
    """Where ``exc`` came out of the user's own code (not abfp, the standard library or an installed
    package): ``raised in your code at FILE:LINE, in FUNCTION`` when its innermost frame is theirs,
    ``from your code at ...`` (their innermost frame) when it was raised deeper, by a library their
    code called; None when it never passed through their code. A ``ValueError`` of a task's
    ``make()`` or a model's ``forward`` is printed as one line like abfp's own errors: this says where."""
    roots = _library_roots()
    where, innermost_is_user = None, False
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        path = code.co_filename
        innermost_is_user = not path.startswith("<") and not str(Path(path).resolve()).startswith(roots)
        if innermost_is_user:
            where = f"{path}:{tb.tb_lineno}, in {code.co_name}"
        tb = tb.tb_next
    if where is None:
        return None
    return f"{'raised in' if innermost_is_user else 'from'} your code at {where}"


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors (unknown option, bad type, bad choice) are one line on
    stderr, ``abfp: error: ... (abfp CMD --help)``, and exit status 2 (argparse's own status)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"abfp: error: {error_line(message)} (see '{self.prog} --help')\n")


# ------------------------------------------------------------------------------ argument types
def csv_list(kind: type, name: str) -> Callable[[str], list[Any]]:
    """An argparse type: a comma-separated list of ``kind`` (empty items skipped, empty list refused)."""
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def require(ok: bool, msg: str) -> None:
    """Raise :class:`UsageError` with ``msg`` unless ``ok``."""
    if not ok:
        raise UsageError(msg)


def require_at_least(args: argparse.Namespace, names: Iterable[str], low: int = 1) -> None:
    """Every option ``names`` (attribute names) that is set must be ``>= low``: ``--batch-size 0``
    and ``--threads 0`` are errors, never silently the defaults."""
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < low:
            raise UsageError(f"{_flag(name)} must be >= {low}, got {v}")


#: Options whose attribute name is not their flag's.
_FLAGS = {"json_path": "--json"}


def note_fewer(option: str, asked: int | None, available: int, of: str, *, quiet: bool = False) -> int:
    """The count a command uses for ``option`` (``asked``; None: all ``available``): at most
    ``available``. When ``asked`` is more, one line on stderr says so (``of`` names what there is,
    e.g. "samples in fashion-cnn's data"), never a silent clamp; the command's JSON and summary give
    the count used. ``quiet``: no line (the other ranks of a distributed run)."""
    if asked is None:
        return available
    if asked > available and not quiet:
        print(f"abfp: note: {option} {asked} is more than the {available} {of}: using {available}", file=sys.stderr)
    return min(asked, available)


def note_evaluated(task: str, available: int, samples: int | None, default: int | None, calibration: int | None,
                   calibration_split: int | None, *, quiet: bool = False) -> int:
    """How many samples an evaluating command (``eval``, ``explore``) evaluates: ``--samples``
    (``samples``; None: the task's ``default``, None: all) of the ``available`` in ``task``'s data,
    with a :func:`note_fewer` line when ``--samples`` asks for more; likewise for a
    ``--calibration-samples`` the user gave (``calibration``; None: not given or not used), which
    takes at most the samples evaluated and the ``calibration_split``'s length (None: no split)."""
    evaluated = note_fewer("--samples", samples, available, f"samples in {task}'s data", quiet=quiet)
    if samples is None and default is not None:
        evaluated = min(evaluated, default)
    if calibration is not None:
        split = calibration_split is not None and calibration_split < evaluated
        note_fewer("--calibration-samples", calibration, calibration_split if split else evaluated,  # type: ignore[arg-type]
                   f"samples in {task}'s calibration split" if split else "samples evaluated", quiet=quiet)
    return evaluated


def refuse_inapplicable(args: argparse.Namespace, why: dict[str, str]) -> None:
    """:class:`UsageError` for the first option of ``why`` (attribute name -> why it does not apply
    in this run) that was given (set, not None, not False): an option that would change nothing
    is refused, never silently ignored. The caller lists only those that do not apply."""
    for name, reason in why.items():
        v = getattr(args, name, None)
        if v is not None and v is not False:
            raise UsageError(f"{_FLAGS.get(name, _flag(name))} does not apply here: {reason}")


def require_finite(args: argparse.Namespace, names: Iterable[str]) -> None:
    """Every float option ``names`` that is set must be finite (no nan, no inf)."""
    for name in names:
        v = getattr(args, name, None)
        if v is not None and not math.isfinite(v):
            raise UsageError(f"{_flag(name)} must be a finite number, got {v}")


# ------------------------------------------------------------------------------ device config
def load_json_arg(spec: str, option: str) -> Any:
    """The parsed value of an option that takes "a JSON file or string" (``--config``, ``--params``).

    Text starting with ``{`` is JSON itself; anything else is a file name, which must exist and be
    a file (a missing file is reported as missing, not as invalid JSON). Errors name the option
    and the file."""
    s = str(spec)
    if s.lstrip().startswith("{"):
        text, where = s, ""
    else:
        p = Path(s)
        if not p.exists():
            raise UsageError(f"{option}: no such file: {s} (give a JSON file or a JSON object)")
        if p.is_dir():
            raise UsageError(f"{option}: {s} is a folder, not a JSON file")
        try:
            text, where = p.read_text(encoding="utf-8"), f" {s}"
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{option}: cannot read {s}: {error_line(e)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{option}{where}: not valid JSON: {e}") from None


def json_kind(obj: Any) -> tuple[str, str] | None:
    """What ``obj`` is when it is a JSON file another abfp command wrote, and what reads it (for
    the error of an option given the wrong one: a plan as ``--config``, eval records as ``--plan``,
    a plan to ``abfp report``); None for anything else."""
    if isinstance(obj, dict):
        fmt = obj.get("format")
        if isinstance(fmt, str) and fmt.startswith("abfp-device-plan/"):
            return "a device plan (abfp tune --json)", "abfp eval, summary and energy take it as --plan"
        if isinstance(fmt, str) and fmt.startswith("abfp-") and "journal" in fmt:
            return "the journal of an unfinished run", "the command that wrote it reads it with --resume"
        if "designs" in obj:
            return "an abfp explore result", "abfp report reads it"
    if isinstance(obj, list) and obj and all(isinstance(r, dict) and "format" in r and "value" in r for r in obj):
        return "abfp eval records (abfp eval --json)", "abfp report reads them"
    return None


def _read_json_quietly(path: Path) -> Any:
    """The JSON in ``path``, None when it does not read or parse (for error messages only)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def load_plan_arg(spec: str) -> Any:
    """``--plan PLAN.json`` (``abfp tune --json``) as a :class:`~abfp.tune.DevicePlan`, or a
    :class:`UsageError` naming the option (a missing file, a folder, a plan that does not load)."""
    from .tune.plan import DevicePlan

    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--plan: no such file: {path}" if not path.exists() else f"--plan: {path} is a folder")
    try:
        return DevicePlan.from_json(path)
    except (ValueError, TypeError) as e:
        kind = json_kind(_read_json_quietly(path))
        if kind is not None and not kind[0].startswith("a device plan"):
            raise UsageError(f"--plan {path} is {kind[0]}, not a device plan: {kind[1]}") from None
        raise UsageError(f"--plan {path}: {' '.join(str(e).split())}") from None


def device_plan_arg(args: argparse.Namespace) -> Any:
    """``--plan`` of a command that otherwise takes ``--preset`` / ``--config`` (``abfp energy``,
    ``abfp summary``) as a DevicePlan, None without it; refused with either of them (the plan sets
    the device). Checked before any work."""
    if getattr(args, "plan", None) is None:
        return None
    given = [f for f, v in (("--preset", getattr(args, "preset", None)), ("--config", getattr(args, "config", None)))
             if v is not None]
    if given:
        raise UsageError("--plan sets the device; drop " + ", ".join(given))
    return load_plan_arg(args.plan)


def plan_model(plan: Any, model: Any, spec: str) -> Any:
    """``model`` converted with ``plan`` (every module at its own device), refused in one line when
    the plan was tuned for another architecture or names modules the model does not have."""
    from .tune.provenance import check_plan_architecture

    try:
        check_plan_architecture(plan.info, model, "it")
        return plan.convert(model)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--plan {spec}: {' '.join(str(e).split())}") from None


def base_config(args: argparse.Namespace) -> ABFPConfig:
    """The device named by ``--config`` (a JSON file or string) or ``--preset``; the default
    :class:`ABFPConfig` when neither is given. Both together are an error."""
    config, preset = getattr(args, "config", None), getattr(args, "preset", None)
    if config is not None and preset is not None:
        raise UsageError("give --preset or --config, not both")
    if config is not None:
        where = "" if str(config).lstrip().startswith("{") else f" {config}"
        obj = load_json_arg(config, "--config")
        try:
            return ABFPConfig.from_dict(obj)
        except ValueError as e:
            kind = json_kind(obj)
            if kind is not None:
                raise UsageError(f"--config{where} is {kind[0]}, not a device config: {kind[1]}") from None
            raise UsageError(f"--config{where}: {error_line(e)}") from None
    if preset is not None:
        try:
            return ABFPConfig.preset(preset)
        except ValueError as e:
            raise UsageError(f"--preset: {error_line(e)}") from None
    return ABFPConfig()


# ------------------------------------------------------------------------------ execution
def apply_threads(threads: int | None) -> None:
    """``--threads N``: torch CPU threads (N >= 1; None leaves torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def resolve_device(spec: str) -> str:
    """``--device``: a torch device string that this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {spec!r} is not a torch device (e.g. cpu, cuda, cuda:0)") from None
    if dev.type == "cpu":
        return spec
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return spec
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"--device {spec}: MPS is not available on this machine")
        return spec
    raise UsageError(f"--device {spec!r}: only cpu, cuda and mps are supported")


# ------------------------------------------------------------------------------ tasks
def resolve_tasks(names: Sequence[str] | None) -> list[Any]:
    """Zoo task names, ``'all'`` (every installed zoo task) or ``path/tasks.py:func`` /
    ``package.module:func`` user tasks -> :class:`abfp.zoo.base.Task` objects."""
    from . import zoo

    names = list(names or ["fashion-cnn"])
    if names == ["all"]:
        names = [n for n in zoo.names() if zoo.available(n)]
    elif "all" in names:
        raise UsageError("--task all runs the whole zoo; do not combine it with other tasks")
    tasks = []
    for name in names:
        module, _, func = name.rpartition(":")
        try:
            if module.endswith(".py") or "/" in module:
                # a task defined in a file: path/to/tasks.py:make
                path = Path(module)
                if not path.is_file():
                    raise UsageError(f"--task: no such file: {path}")
                tasks.append(zoo.load_callable(f"{path}:{func}"))  # imported under a name unique to the file
            elif module:
                tasks.append(zoo.load_callable(name))
            else:
                tasks.append(zoo.get(name))
        except KeyError as e:
            raise UsageError(error_line(e)) from None
    return tasks


def single_task(name: str, command: str) -> Any:
    """The one task of a command that takes one (``summary``, ``energy``, ``precision``)."""
    if name == "all":
        raise UsageError(f"{command} takes one task; 'all' is for 'abfp eval' (run {command} once per task)")
    (task,) = resolve_tasks([name])
    return task


# ------------------------------------------------------------------------------ outputs
def add_force_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--force`` (overwrite existing outputs) to ``parser`` unless it has it already."""
    if "--force" in parser._option_string_actions:  # noqa: SLF001  (idempotent: registered once)
        return
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing output files (without it an existing output is an error)")


def check_journal(journal: Path, args: argparse.Namespace) -> bool:
    """A command's journal of finished work (:mod:`abfp.journal`), before any work: an existing one
    needs ``--resume`` (continue it) or ``--force`` (start afresh). Returns whether the run resumes
    one (then it may replace its own outputs, written by the run it continues). ``--resume`` with no
    journal starts from the beginning, said in one line on stderr (a retry loop that always passes
    ``--resume`` works even when the first run was killed before it journalled anything)."""
    if journal.exists() and not (args.resume or args.force):
        raise UsageError(f"{journal} holds an unfinished run: --resume continues it, --force starts afresh")
    check_output(journal, force=True, what="journal")
    if args.resume and not journal.exists():
        print(f"abfp: note: --resume: no journal at {journal}, nothing to continue: starting from the beginning",
              file=sys.stderr)
    return bool(args.resume and journal.is_file())


def check_output_args(args: argparse.Namespace, options: dict[str, str]) -> list[Path]:
    """Check the output files named by ``options`` (attribute -> flag, e.g. ``{"json_path": "--json"}``)
    before any work: a folder, a path under a file, an unwritable folder or (without ``--force``) an
    existing file is a one-line error naming the flag. Returns the paths that are set."""
    force = bool(getattr(args, "force", False))
    named: dict[Path, str] = {}
    for attr, flag in options.items():
        v = getattr(args, attr, None)
        if v is None:
            continue
        named[check_output(v, force=force, what=flag)] = flag
    out = list(named)
    if len({p.resolve() for p in out}) < sum(getattr(args, a, None) is not None for a in options):
        raise UsageError(f"{', '.join(options.values())} must name different files")
    refuse_overwriting_inputs(args, named)
    return out


#: Options (attribute -> flag) that name a file the command reads. No output may be one of them:
#: with ``--force`` the output would replace the input it was computed from (an ``abfp eval --plan
#: p.json --json p.json --force`` used to leave the records where the plan was).
INPUT_OPTIONS = {"config": "--config", "plan": "--plan", "weights": "--weights", "params": "--params"}


def input_files(args: argparse.Namespace) -> dict[Path, str]:
    """The files ``args`` reads, each with the option that names it: :data:`INPUT_OPTIONS` given as
    file names (not inline JSON) and the files of ``--task path/tasks.py:make`` task specs."""
    files: dict[Path, str] = {}
    for attr, flag in INPUT_OPTIONS.items():
        v = getattr(args, attr, None)
        if isinstance(v, str) and v and not v.lstrip().startswith("{"):
            files[Path(v)] = flag
    tasks = getattr(args, "tasks", None) or [getattr(args, "task", None)]
    for spec in tasks:
        module = spec.rpartition(":")[0] if isinstance(spec, str) else ""
        if module.endswith(".py") or "/" in module:
            files[Path(module)] = "--task"
    return files


def refuse_overwriting_inputs(args: argparse.Namespace, outputs: dict[Path, str],
                              inputs: dict[Path, str] | None = None) -> None:
    """:class:`UsageError` when an output (path -> its flag) is the same file as one the command
    reads (:func:`input_files` of ``args``, plus ``inputs``): checked before any work, whatever
    ``--force`` says. Same file: :func:`os.path.samefile` (a link or another spelling of the path
    counts); an output that does not exist yet is no input."""
    sources = {**input_files(args), **(inputs or {})}
    for out, flag in outputs.items():
        for src, src_flag in sources.items():
            if Path(out).exists() and src.exists() and os.path.samefile(out, src):
                raise UsageError(f"{flag} {str(out)!r} is the {src_flag} file this command reads: write the output "
                                 "to another file (--force would replace the input)")
