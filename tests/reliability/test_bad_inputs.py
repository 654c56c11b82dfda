"""Bad input to every ``abfp`` command: exit status 2, ONE line on stderr naming the problem, no
traceback, and for output errors no work started.

Each case is ``(command line, fragment the error line must contain)``. Paths use placeholders
filled in a fresh folder per test: ``{dir}`` an existing folder, ``{file}`` an existing file,
``{missing}`` a path that does not exist, ``{exists_json}`` an existing JSON file,
``{badjson}`` a file that is not JSON, ``{records}`` valid eval records, ``{report_out}`` a
folder that already holds ``report.md``, ``{micro_out}`` one that holds ``microbench.json``,
``{png}`` an existing PNG, ``{text}`` a long text file that is not JSON. Most run in-process through :func:`abfp.cli.main`; a few also as
subprocesses (the real ``python -m abfp``). The work functions of every command are replaced by
a trap, so that a check that happens too late (after the work started) fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abfp.cli import main

NO_CUDA = not torch.cuda.is_available()

EVAL = [
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "x"], "--threads"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--calibration-samples", "0"], "--calibration-samples must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--device", "foo"], "--device 'foo'"),
    (["--device", "tpu"], "--device 'tpu'"),
    *([(["--device", "cuda"], "CUDA is not available")] if NO_CUDA else []),
    (["--preset", "no-such"], "unknown preset 'no-such'"),
    (["--preset", "default", "--config", "{}"], "--preset or --config, not both"),
    (["--config", "{missing}"], "--config: no such file"),
    (["--config", "{dir}"], "is a folder"),
    (["--config", "{badjson}"], "not valid JSON"),
    (["--config", "{text}"], "not valid JSON"),
    (["--config", '{"gain": -1}'], "gain"),
    (["--config", '{"colour": 1}'], "unknown ABFPConfig field"),
    (["--gains", "0"], "gain must be > 0"),
    (["--gains", "fast"], "gain must be a positive number"),
    (["--bits", "9/9"], "bits must look like"),
    (["--bits", "1/8/8"], "weight_bits"),
    (["--tile-widths", "0"], "--tile-widths"),
    (["--tile-widths", "8,x"], "--tile-widths"),
    (["--noise", "-1"], "--noise"),
    (["--noise", "nan"], "--noise"),
    (["--noise-dist", "pink"], "--noise-dist"),
    (["--fixed-percentile", "0"], "--fixed-percentile"),
    (["--paper", "--gains", "1"], "--paper sets the grid"),
    (["--task", "no-such-model"], "unknown zoo task"),
    (["--task", "{missing}.py:make"], "no such file"),
    (["--task", "all", "--task", "fashion-cnn"], "--task all"),
    (["--json", "{dir}"], "is a folder"),
    (["--json", "{file}/r.json"], "is a file, not a folder"),
    (["--json", "{exists_json}"], "exists; pass --force"),
    (["--cache-dir", "{file}"], "--cache-dir"),
    (["--cache-dir", "{file}/cache"], "is a file, not a folder"),
    (["--unknown-option"], "unrecognized arguments"),
]

REPORT = [
    (["{missing}"], "no such file"),
    (["{dir}"], "is a folder"),
    (["{badjson}"], "not valid JSON"),
    (["{exists_json}"], "no records"),
    (["{records}", "--out", "{file}"], "is a file, not a folder"),
    (["{records}", "--out", "{file}/sub"], "is a file, not a folder"),
    (["{records}", "--out", "{report_out}"], "already holds report.md; pass --force"),
]

MICROBENCH = [
    (["--batch", "0"], "--batch must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--tile-widths", "0"], "--tile-widths"),
    (["--gains", "0"], "--gains"),
    (["--gains", "inf"], "--gains"),
    (["--seed", "-1"], "--seed"),
    (["--out", "{file}"], "is a file, not a folder"),
    (["--out", "{file}/sub"], "is a file, not a folder"),
    (["--out", "{micro_out}"], "already holds microbench.json; pass --force"),
]

SUMMARY = [
    (["--task", "no-such-model"], "unknown zoo task"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--preset", "no-such"], "unknown preset"),
    (["--preset", "default", "--config", "{}"], "not both"),
    (["--config", "{missing}"], "--config: no such file"),
    (["--config", "{badjson}"], "not valid JSON"),
]

FINETUNE = [
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--config", "{missing}"], "--config: no such file"),
    (["--config", "{badjson}"], "not valid JSON"),
    (["--preset", "default", "--config", "{}"], "not both"),
    (["--json", "{dir}"], "is a folder"),
    (["--json", "{file}/r.json"], "is a file, not a folder"),
    (["--json", "{exists_json}"], "exists; pass --force"),
    (["--save-model", "{dir}"], "is a folder"),
    (["--save-model", "{exists_json}"], "exists; pass --force"),
]

PRECISION = [
    (["--threads", "0"], "--threads must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--seed", "-2"], "--seed must be >= 0"),
    (["--task", "all"], "takes one task"),
    (["--task", "no-such-model"], "unknown zoo task"),
    (["--json", "{dir}"], "is a folder"),
    (["--json", "{exists_json}"], "exists; pass --force"),
    (["--json", "{file}/r.json"], "is a file, not a folder"),
    (["--plot", "{png}"], "exists; pass --force"),
]

ENERGY = [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--preset", "no-such"], "unknown preset"),
    (["--preset", "default", "--config", "{}"], "not both"),
    (["--config", "{missing}"], "--config: no such file"),
    (["--config", "{badjson}"], "not valid JSON"),
    (["--params", "{missing}"], "--params: no such file"),
    (["--params", "{text}"], "--params"),
    (["--params", '{"adc": -1}'], "adc"),
    (["--task", "all"], "takes one task"),
    (["--json", "{dir}"], "is a folder"),
    (["--json", "{exists_json}"], "exists; pass --force"),
    (["--json", "{file}/r.json"], "is a file, not a folder"),
]

TUNE = [  # each with a valid --json in a fresh folder unless the case is about --json
    (["--json", "{fresh_json}", "--calibration", "0"], "--calibration must be >= 1"),
    (["--json", "{fresh_json}", "--eval-samples", "0"], "--eval-samples must be >= 1"),
    (["--json", "{fresh_json}", "--gain-samples", "0"], "--gain-samples must be >= 1"),
    (["--json", "{fresh_json}", "--max-gain", "0"], "--max-gain must be >= 1"),
    (["--json", "{fresh_json}", "--gains", "1,x"], "not a valid float"),
    (["--json", "{fresh_json}", "--max-repeats", "0"], "--max-repeats must be >= 1"),
    (["--json", "{fresh_json}", "--target", "nan"], "--target must be a finite number"),
    (["--json", "{fresh_json}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--json", "{fresh_json}", "--threads", "0"], "--threads must be >= 1"),
    (["--json", "{fresh_json}", "--preset", "no-such"], "unknown preset"),
    (["--json", "{fresh_json}", "--preset", "default", "--config", "{}"], "not both"),
    (["--json", "{fresh_json}", "--task", "no-such-model"], "unknown zoo task"),
    (["--json", "{fresh_json}", "--task", "all"], "takes one task"),
    (["--json", "{fresh_json}", "--finetune", "distil"], "--finetune: invalid choice"),
    (["--json", "{fresh_json}", "--finetune-steps", "5"], "--finetune-steps goes with --finetune"),
    (["--json", "{fresh_json}", "--finetune", "distil-qat", "--finetune-steps", "0"], "--finetune-steps must be >= 1"),
    (["--json", "{fresh_json}", "--finetune", "distil-dnf", "--finetune-lr", "-1"], "--finetune-lr must be > 0"),
    (["--json", "{fresh_json}", "--finetune", "distil-qat", "--finetune-lr", "inf"], "--finetune-lr must be a finite"),
    (["--json", "{fresh_json}", "--finetune", "distil-qat", "--finetune-batch-size", "0"],
     "--finetune-batch-size must be >= 1"),
    (["--json", "{fresh_json}", "--finetune", "distil-qat", "--finetune-loss", "ce"], "--finetune-loss: invalid choice"),
    (["--json", "{fresh_json}", "--gain-tolerance", "-1"], "--gain-tolerance must be >= 0"),
    (["--json", "{fresh_json}", "--gain-tolerance", "nan"], "--gain-tolerance must be a finite number"),
    (["--json", "{fresh_json}", "--gain-rule", "saturation", "--gain-tolerance", "0.1"], "goes with the error rule"),
    ([], "required: --json"),
    (["--json", "{dir}"], "is a folder"),
    (["--json", "{exists_json}"], "exists; pass --force"),
    (["--json", "{file}/r.json"], "is a file, not a folder"),
]

EXPLORE = [  # each with a valid fresh --json unless the case is about an output
    (["--json", "{fresh_json}", "--target", "90", "--target-drop", "1"], "not both"),
    (["--json", "{fresh_json}", "--target-drop", "nan"], "finite"),
    (["--json", "{fresh_json}", "--target-drop", "100"], "target drop"),
    (["--json", "{fresh_json}", "--adc-bits", "1,16"], "ADC bits"),
    (["--json", "{fresh_json}", "--gains", "0"], "gain"),
    (["--json", "{fresh_json}", "--formats", "float"], "formats"),
    (["--json", "{fresh_json}", "--tile-widths", "0"], "tile widths"),
    (["--json", "{fresh_json}", "--noise", "-1"], "noise"),
    (["--json", "{fresh_json}", "--runs", "0"], "--runs"),
    (["--json", "{fresh_json}", "--params", '{"adc": -1}'], "adc"),
    (["--json", "{fresh_json}", "--task", "all"], "one task"),
    (["--json", "{fresh_json}", "--task", "no-such-model"], "unknown zoo task"),
    (["--json", "{fresh_json}", "--preset", "no-such"], "--preset"),
    (["--json", "{fresh_json}", "--threads", "0"], "--threads must be >= 1"),
    (["--json", "{fresh_json}", "--early-stop", "0"], "early stop"),
    (["--json", "{fresh_json}", "--early-stop", "-2"], "early stop"),
    (["--json", "{fresh_json}", "--early-stop", "inf"], "finite"),
    (["--json", "{fresh_json}", "--early-stop", "nan"], "finite"),
    (["--json", "{fresh_json}", "--early-stop", "three"], "--early-stop"),
    (["--json", "{fresh_json}", "--global-prune", "yes"], "unrecognized arguments"),
    (["--json", "{dir}"], "is a folder"),
    (["--json", "{exists_json}"], "exists; pass --force"),
    (["--json", "{file}/r.json"], "is a file, not a folder"),
]

OTHERS = [
    (["presets", "--foo"], "unrecognized arguments"),
    (["zoo", "--foo"], "unrecognized arguments"),
]

#: Options that would change nothing in the run they are given to: refused, never silently ignored.
INAPPLICABLE = [
    (["eval", "--no-fixed", "--fixed-percentile", "99"], "--fixed-percentile does not apply"),
    (["eval", "--no-fixed", "--gains", "1,2", "--calibration-samples", "8"], "--calibration-samples does not apply"),
    (["eval", "--noise", "0", "--runs", "2"], "--runs does not apply"),
    (["eval", "--preset", "fixed-888-n32", "--no-fixed"], "--no-fixed does not apply"),
    (["eval", "--config", '{"execution": {"seed": 4}}', "--seed", "3"], "--seed 3 and the device's own seed 4"),
    (["eval", "--noise", "0", "--seed", "3"], "--seed does not apply"),
    (["eval", "--noise", "0", "--noise-dist", "gaussian"], "--noise-dist does not apply"),
    (["explore", "--json", "{fresh_json}", "--html"], "--html does not apply"),
    (["explore", "--json", "{fresh_json}", "--formats", "abfp", "--fixed-gains", "1,2"], "--fixed-gains does not apply"),
    (["explore", "--json", "{fresh_json}", "--formats", "abfp", "--fixed-percentile", "99"],
     "--fixed-percentile does not apply"),
    (["explore", "--json", "{fresh_json}", "--formats", "fixed", "--gains", "1,2"], "--gains does not apply"),
    (["explore", "--json", "{fresh_json}", "--formats", "abfp", "--gains", "1,2", "--calibration-samples", "8"],
     "--calibration-samples does not apply"),
    (["explore", "--json", "{fresh_json}", "--screen-z", "2"], "--screen-z does not apply"),
    (["explore", "--json", "{fresh_json}", "--dac-search", "none", "--dac-min-bits", "4"], "--dac-min-bits does not apply"),
    (["explore", "--json", "{fresh_json}", "--noise", "0", "--runs", "2"], "--runs does not apply"),
    (["explore", "--json", "{fresh_json}", "--noise", "0", "--seed", "2"], "--seed does not apply"),
    (["explore", "--json", "{fresh_json}", "--noise", "0", "--early-stop", "3"], "--early-stop does not apply"),
    # a --config naming a tile width, mode or gain the search replaces by its own
    (["explore", "--json", "{fresh_json}", "--config", '{"tile_width": 64}'], "tile_width 64 is not searched"),
    (["explore", "--json", "{fresh_json}", "--formats", "abfp", "--config", '{"mode": "fixed"}'],
     "mode 'fixed' is not searched"),
    (["explore", "--json", "{fresh_json}", "--config", '{"gain": 3}'], "gain 3.0 is not searched"),
    (["precision", "--quiet", "--target", "80", "--target-drop", "1"], "not both"),
    (["precision", "--quiet", "--noise", "thermal", "--aj-per-photon", "0.2"], "--aj-per-photon does not apply"),
    (["finetune", "--no-progress", "--time-steps", "2", "--json", "{fresh_json}"], "--json does not apply"),
    (["finetune", "--no-progress", "--time-steps", "2", "--resume"], "--resume does not apply"),
    (["finetune", "--no-progress", "--checkpoint", "", "--checkpoint-every", "5"], "--checkpoint-every does not apply"),
    (["tune", "--json", "{fresh_json}", "--no-repeats", "--max-repeats", "4"], "--max-repeats does not apply"),
    (["tune", "--json", "{fresh_json}", "--config", '{"execution": {"seed": 4}}', "--seed", "3"],
     "--seed 3 and the device's own seed 4"),
    (["tune", "--json", "{fresh_json}", "--gains", "1,2", "--max-gain", "4"], "--max-gain does not apply"),
    # session 18: a noise-free device without distillation draws nothing (the seed was taken and changed nothing)
    (["tune", "--json", "{fresh_json}", "--config", '{"noise_std": 0}', "--seed", "3"], "--seed does not apply"),
]

CASES = ([(["eval", *a], m) for a, m in EVAL] + INAPPLICABLE + [(["report", *a], m) for a, m in REPORT]
         + [(["microbench", *a], m) for a, m in MICROBENCH] + [(["summary", *a], m) for a, m in SUMMARY]
         + [(["finetune", "--no-progress", *a], m) for a, m in FINETUNE]
         + [(["precision", "--quiet", *a], m) for a, m in PRECISION] + [(["energy", *a], m) for a, m in ENERGY]
         + [(["tune", *a], m) for a, m in TUNE] + [(["explore", *a], m) for a, m in EXPLORE] + OTHERS)
COMMANDS = sorted({argv[0] for argv, _ in CASES})


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile.txt").write_text("x")
    (tmp_path / "exists.json").write_text("[]")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "records.json").write_text(json.dumps([{"model": "m", "format": "fp32", "value": 1.0}]))
    (tmp_path / "report_out").mkdir()
    (tmp_path / "report_out" / "report.md").write_text("old report")
    (tmp_path / "micro_out").mkdir()
    (tmp_path / "micro_out" / "microbench.json").write_text("[]")
    (tmp_path / "old.png").write_bytes(b"png")
    (tmp_path / "notes.txt").write_text("a long text file, not JSON. " * 20)
    return {"dir": str(tmp_path / "folder"), "file": str(tmp_path / "afile.txt"),
            "missing": str(tmp_path / "no_such"), "exists_json": str(tmp_path / "exists.json"),
            "badjson": str(tmp_path / "bad.json"), "records": str(tmp_path / "records.json"),
            "report_out": str(tmp_path / "report_out"), "micro_out": str(tmp_path / "micro_out"),
            "png": str(tmp_path / "old.png"), "text": str(tmp_path / "notes.txt"),
            "fresh_json": str(tmp_path / "fresh" / "plan.json")}


def _fill(argv: list[str], paths: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for name, value in paths.items():
            a = a.replace("{" + name + "}", value)
        out.append(a)
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Replace every command's work with a trap: reaching it means a check came too late."""
    def trap(*a, **k):
        raise AssertionError("work started before the bad input was refused")

    import abfp.energy
    import abfp.evaluate
    import abfp.evaluate.microbench
    import abfp.evaluate.report
    import abfp.finetune.methods
    import abfp.nn
    import abfp.precision.experiment
    import abfp.explore.search
    import abfp.tune.api

    for mod, name in ((abfp.evaluate, "evaluate"), (abfp.evaluate.report, "write_report"),
                      (abfp.evaluate.microbench, "run_microbench"), (abfp.nn, "summary"),
                      (abfp.finetune.methods, "dnf"), (abfp.finetune.methods, "qat"),
                      (abfp.precision.experiment, "run_precision"), (abfp.energy, "account"),
                      (abfp.tune.api, "tune"), (abfp.explore.search, "explore_model")):
        monkeypatch.setattr(mod, name, trap)


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (unknown option, bad type or choice)
        code = e.code
    return code, capsys.readouterr().err


def _assert_one_line(code: int, err: str, fragment: str, argv: list[str]) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1, (argv, err)
    assert lines[0].startswith("abfp: error:"), (argv, err)
    assert fragment in lines[0], (argv, fragment, lines[0])
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_before_any_work(argv, fragment, paths, no_work, capsys, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # default outputs (checkpoints, caches) would land in the test's folder
    filled = _fill(argv, paths)
    before = _snapshot(tmp_path)
    t0 = time.perf_counter()
    code, err = _run_in_process(filled, capsys)
    _assert_one_line(code, err, fragment, filled)
    assert time.perf_counter() - t0 < 30  # refused at once (generous: a loaded shared machine)
    assert _snapshot(tmp_path) == before  # nothing written, nothing overwritten, no folder created


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# A few through the real entry point, as a user runs them.
SUBPROCESS = [
    (["eval", "--threads", "-1"], "--threads must be >= 1"),
    (["eval", "--json", "{dir}"], "is a folder"),
    (["report", "{records}", "--out", "{report_out}"], "pass --force"),
    (["finetune", "--config", "{missing}"], "--config: no such file"),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv,fragment", SUBPROCESS, ids=[" ".join(a) for a, _ in SUBPROCESS])
def test_bad_input_through_python_m_abfp(argv, fragment, paths, tmp_path):
    filled = _fill(argv, paths)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    p = subprocess.run([sys.executable, "-m", "abfp", *filled], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120, env=env)
    _assert_one_line(p.returncode, p.stderr, fragment, filled)


def test_every_command_is_covered():
    from abfp.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    print(f"\n{len(CASES)} bad inputs over {len(COMMANDS)} commands in-process, {len(SUBPROCESS)} as subprocesses: "
          "all one-line errors, exit 2")


def test_every_writing_command_has_force():
    from abfp.cli import WRITING_COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in WRITING_COMMANDS:
        assert "--force" in sub.choices[name]._option_string_actions, name
