"""No output of an ``abfp`` command may be a file the command reads (``--plan``, ``--weights``,
``--config``, ``--params``, a ``--task path.py:make`` file, ``abfp report``'s input): even with
``--force`` it is refused before any work, naming both options, and the input is left as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from abfp.cli import main

PLAN = {"format": "abfp-device-plan/1", "base": {}, "modules": {}, "exclude": [], "info": {}}
TASK = "import torch\n\ndef make():\n    return torch.nn.Linear(4, 3), torch.randn(8, 4), 'agreement'\n"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {"plan": tmp_path / "plan.json", "weights": tmp_path / "w.safetensors", "config": tmp_path / "cfg.json",
           "task": tmp_path / "tasks.py", "records": tmp_path / "records.json", "params": tmp_path / "params.json"}
    out["plan"].write_text(json.dumps(PLAN))
    out["weights"].write_bytes(b"not read before the refusal")
    out["config"].write_text(json.dumps({"tile_width": 8}))
    out["task"].write_text(TASK)
    out["records"].write_text(json.dumps([{"model": "m", "format": "fp32", "value": 1.0, "metric": "top1"}]))
    out["params"].write_text("{}")
    return out


CASES = {
    "eval --plan": (["eval", "--task", "{task}:make", "--plan", "{plan}", "--json", "{plan}"], "--plan"),
    "eval --weights": (["eval", "--task", "{task}:make", "--plan", "{plan}", "--weights", "{weights}",
                        "--json", "{weights}"], "--weights"),
    "eval --config": (["eval", "--task", "{task}:make", "--config", "{config}", "--json", "{config}"], "--config"),
    "eval --task file": (["eval", "--task", "{task}:make", "--json", "{task}"], "--task"),
    "tune --config": (["tune", "--task", "{task}:make", "--config", "{config}", "--json", "{config}"], "--config"),
    "tune --task file": (["tune", "--task", "{task}:make", "--json", "{task}"], "--task"),
    "energy --plan": (["energy", "--task", "{task}:make", "--plan", "{plan}", "--json", "{plan}"], "--plan"),
    "energy --params": (["energy", "--task", "{task}:make", "--params", "{params}", "--json", "{params}"],
                        "--params"),
    "explore --config": (["explore", "--task", "{task}:make", "--config", "{config}", "--json", "{config}"],
                         "--config"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_output_that_is_an_input_is_refused_even_with_force(case, files, capsys):
    argv, flag = CASES[case]
    argv = [a.format(**files) for a in argv] + ["--force"]
    before = {k: p.read_bytes() for k, p in files.items()}
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is the {flag} file this command reads" in err, err
    assert {k: p.read_bytes() for k, p in files.items()} == before


def test_a_link_to_the_input_is_the_input(files, capsys):
    link = files["plan"].with_name("link.json")
    os.symlink(files["plan"], link)
    assert main(["eval", "--task", f"{files['task']}:make", "--plan", str(files["plan"]), "--json", str(link),
                 "--force"]) == 2
    assert "is the --plan file this command reads" in capsys.readouterr().err
    assert json.loads(files["plan"].read_text()) == PLAN


def test_report_refuses_to_write_over_its_input(files, capsys):
    folder = files["records"].parent
    moved = folder / "report.md"
    files["records"].rename(moved)
    assert main(["report", str(moved), "--out", str(folder), "--force"]) == 2
    assert "is the input JSON file this command reads" in capsys.readouterr().err
    assert json.loads(moved.read_text())[0]["model"] == "m"


def test_distinct_outputs_still_work(files, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["energy", "--task", f"{files['task']}:make", "--plan", str(files["plan"]), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["plan_file"] == str(files["plan"])
