"""A plan JSON whose ``info`` is damaged is refused (it used to load with its ``info`` silently
dropped, or with an ``info.weights`` record that let the architecture check pass any model), and
a plan tuned for another model is refused naming the plan file and the task it was tuned on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from abfp import ABFPConfig, DevicePlan
from abfp.cli import main
from abfp.tune.provenance import architecture_fingerprint

TASK = "import torch\n\ndef make():\n    torch.manual_seed(0)\n    return torch.nn.Linear(6, 4), torch.randn(8, 6), 'agreement'\n"


def _plan(info: object) -> str:
    return json.dumps({"format": "abfp-device-plan/1", "base": {}, "modules": {}, "exclude": [], "info": info})


@pytest.mark.parametrize("info,message", [
    ([1], "'info' must be a JSON object, got list"),
    ("notes", "'info' must be a JSON object, got str"),
    ({"weights": "plan.safetensors"}, "info 'weights' must be a JSON object with the 'architecture'"),
    ({"weights": {"file": "plan.safetensors"}}, "info 'weights' must be a JSON object with the 'architecture'"),
    ({"weights": {"architecture": 3}}, "info 'weights' must be a JSON object with the 'architecture'"),
])
def test_a_damaged_info_is_refused(info, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DevicePlan.from_json(_plan(info))


def test_a_plan_written_by_hand_and_a_tuned_one_still_load():
    assert DevicePlan.from_json(_plan({})).info == {}
    model = nn.Linear(6, 4)
    info = {"task": "t", "weights": {"architecture": architecture_fingerprint(model), "file": "w.safetensors"}}
    assert DevicePlan.from_json(_plan(info)).info == info
    assert DevicePlan(ABFPConfig(), info=info).to_dict()["info"] == info


@pytest.mark.parametrize("command", ["eval", "summary", "energy"])
def test_a_plan_for_another_model_names_its_file_and_task(command, tmp_path: Path, capsys):
    task = tmp_path / "mine.py"
    task.write_text(TASK)
    other = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    plan = tmp_path / "plan.json"
    plan.write_text(_plan({"task": "theirs.py:make", "weights": {"architecture": architecture_fingerprint(other)}}))
    extra = ["--cache-dir", "", "--no-progress"] if command == "eval" else []
    assert main([command, "--task", f"{task}:make", "--plan", str(plan), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--plan {plan}" in err, err
    assert "tuned for another architecture (tuned on task 'theirs.py:make', fingerprint" in err, err
    # the plan made for this architecture passes
    ok = tmp_path / "ok.json"
    ok.write_text(_plan({"weights": {"architecture": architecture_fingerprint(nn.Linear(6, 4))}}))
    assert main([command, "--task", f"{task}:make", "--plan", str(ok), *extra]) == 0


UNSEEDED = "import torch\n\ndef make():\n    return torch.nn.Linear(6, 4), torch.randn(8, 6), 'agreement'\n"


def test_eval_plan_without_weights_notes_a_model_that_is_not_the_tuned_one(tmp_path: Path, capsys):
    """A task whose make() builds its model unseeded (or a finetuned plan evaluated without
    --weights) was evaluated silently on other weights than the plan was tuned on."""
    task = tmp_path / "unseeded.py"
    task.write_text(UNSEEDED)
    out = tmp_path / "t"
    assert main(["tune", "--task", f"{task}:make", "--json", str(out / "plan.json"), "--no-progress"]) == 0
    capsys.readouterr()
    argv = ["eval", "--task", f"{task}:make", "--plan", str(out / "plan.json"), "--cache-dir", "", "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "this model's weights are not the ones the plan was tuned with (digest differs): --weights " \
           "plan.safetensors gives those" in err, err
    assert main(argv + ["--weights", str(out / "plan.safetensors")]) == 0
    assert "not the ones" not in capsys.readouterr().err  # the tuned weights: no note


def test_eval_plan_of_the_same_model_says_nothing(tmp_path: Path, capsys):
    task = tmp_path / "mine.py"
    task.write_text(TASK)
    out = tmp_path / "t"
    assert main(["tune", "--task", f"{task}:make", "--json", str(out / "plan.json"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--task", f"{task}:make", "--plan", str(out / "plan.json"), "--cache-dir", "",
                 "--no-progress"]) == 0
    assert "not the ones" not in capsys.readouterr().err
