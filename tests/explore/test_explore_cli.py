"""``abfp explore`` on the command line: a user task end to end, the report, and bad input."""

import json
import re
from pathlib import Path

import pytest

from abfp.cli import main
from abfp.explore.report import DESIGN_KEYS, RESULT_KEYS

TASK = str(Path(__file__).with_name("explore_tiny_task.py")) + ":make"
QUICK = ["explore", "--task", TASK, "--formats", "abfp", "--tile-widths", "32", "--gains", "4", "--noise", "0",
         "--adc-bits", "4,8", "--dac-search", "none", "--no-progress"]


@pytest.mark.slow  # explores a tiny model, then reports on it (seconds)
def test_explore_user_task_json_report_and_force(tmp_path, capsys):
    out_json, out_dir = tmp_path / "explore.json", tmp_path / "rep"
    args = QUICK + ["--json", str(out_json), "--out", str(out_dir), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "abfp-n32" in printed and "pJ/inference" in printed
    res = json.loads(out_json.read_text())
    assert all(k in res for k in RESULT_KEYS)
    assert res["designs"] and all(all(k in d for k in DESIGN_KEYS) for d in res["designs"])
    assert list(res["cheapest"]) == ["abfp-n32"]
    assert (out_dir / "explore.md").is_file() and (out_dir / "pareto.png").stat().st_size > 1000
    assert "Pareto" in (out_dir / "explore.md").read_text()
    # existing outputs are refused without --force, before any work, in one line
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("abfp: error:") and "--force" in err and "\n" not in err
    # abfp report recognises an explore JSON
    assert main(["report", str(out_json), "--out", str(tmp_path / "rep2")]) == 0
    assert (tmp_path / "rep2" / "explore.md").is_file() and (tmp_path / "rep2" / "pareto.png").is_file()
    assert main(["report", str(out_json), "--out", str(tmp_path / "rep3"), "--html"]) == 0
    assert "<table>" in (tmp_path / "rep3" / "explore.html").read_text()


@pytest.mark.parametrize("extra,match", [
    (["--target", "90", "--target-drop", "1"], "not both"),
    (["--target-drop", "nan"], "finite"),
    (["--target-drop", "100"], "target drop"),
    (["--adc-bits", "1,16"], "ADC bits"),
    (["--adc-bits", "8"], "--adc-bits"),
    (["--gains", "0"], "gain"),
    (["--gains", "x"], "gain"),
    (["--formats", "float"], "formats"),
    (["--tile-widths", "0"], "tile widths"),
    (["--noise", "-1"], "noise"),
    (["--runs", "0"], "--runs"),
    (["--calibration-samples", "0"], "--calibration-samples"),
    (["--dac-search", "joint", "--dac-min-bits", "12"], "--dac-min-bits"),
    (["--dac-max-bits", "6"], "--dac-max-bits"),
    (["--dac-max-bits", "30"], "DAC maximum"),
    (["--screen", "0"], "screen samples"),
    (["--screen-z", "nan"], "finite"),
    (["--dac-search", "all"], "--dac-search"),
    (["--params", "{\"adc\": -1}"], "adc"),
    (["--task", "all"], "one task"),
    (["--task", "no/such/file.py:make"], "no such file"),
    (["--preset", "nope"], "--preset"),
    (["--config", '{"input_bits": 24, "weight_bits": 24, "tile_width": 8}', "--tile-widths", "8,256"], "2\\*\\*53"),
])
def test_bad_input_is_one_line_exit_2_before_any_work(extra, match, tmp_path, capsys, monkeypatch):
    import abfp.explore.search as search

    def never(*a, **k):  # pragma: no cover - reached only if validation let bad input through
        raise AssertionError("work started on bad input")

    monkeypatch.setattr(search, "explore_model", never)
    assert _run(QUICK + ["--cache-dir", "", "--json", str(tmp_path / "x.json")] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("abfp: error:") and "\n" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "x.json").exists()


def _run(argv):
    """``main``'s exit status, also when argparse itself exits (a value of the wrong type)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_report_refuses_a_bad_explore_json(tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"designs": [], "target": 1, "fp32": 1, "metric": "m", "energy_params": {},
                             "cheapest": {}}))
    assert main(["report", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "designs must be a non-empty list" in err and not (tmp_path / "o").exists()
