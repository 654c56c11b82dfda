"""A JSON file that another abfp command wrote, given to the wrong option, is named for what it
is and what reads it: a device plan as ``--config`` or to ``abfp report``, eval records or an
explore result as ``--plan`` or ``--config`` (they were refused as unknown config fields, a
DevicePlan that needs an object, or records that must be a list)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abfp.cli import main

PLAN = {"format": "abfp-device-plan/1", "base": {}, "modules": {}, "exclude": [], "info": {}}
RECORDS = [{"model": "m", "format": "fp32", "value": 1.0, "metric": "top1"}]
EXPLORE = {"task": "m", "designs": []}

CASES = [
    (PLAN, ["eval", "--config", "{f}"], "--config {f} is a device plan (abfp tune --json), not a device config: "
                                         "abfp eval, summary and energy take it as --plan"),
    (PLAN, ["report", "{f}"], "{f} is a device plan (abfp tune --json), not eval records or an explore result"),
    (RECORDS, ["eval", "--plan", "{f}"], "--plan {f} is abfp eval records (abfp eval --json), not a device plan: "
                                         "abfp report reads them"),
    (EXPLORE, ["summary", "--plan", "{f}"], "--plan {f} is an abfp explore result, not a device plan"),
    (EXPLORE, ["tune", "--config", "{f}", "--json", "{out}"], "--config {f} is an abfp explore result, not a device config"),
]


@pytest.mark.parametrize("obj,argv,message", CASES)
def test_a_json_of_another_command_is_named(obj, argv, message, tmp_path: Path, capsys):
    f = tmp_path / "in.json"
    f.write_text(json.dumps(obj))
    names = {"f": str(f), "out": str(tmp_path / "plan.json")}
    assert main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(**names) in err, err


def test_a_plan_of_another_version_still_says_its_format(tmp_path: Path, capsys):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({**PLAN, "format": "abfp-device-plan/2"}))
    assert main(["summary", "--plan", str(f)]) == 2
    assert "format is 'abfp-device-plan/2', expected 'abfp-device-plan/1'" in capsys.readouterr().err
