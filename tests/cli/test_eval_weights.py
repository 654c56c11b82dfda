"""``abfp eval --weights W`` without ``--plan``: the weights ``abfp finetune --save-model`` (or
``abfp tune``) wrote are evaluated on any grid; was refused ('--weights goes with --plan'), so a
finetuned model could not be swept without writing a task of its own."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from abfp.cli import main

TASK = '''import torch


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(48, 8)
    return model, (x, torch.zeros(48, dtype=torch.long)), "top1"
'''

GRID = ["--cache-dir", "", "--no-progress", "--gains", "1", "--tile-widths", "8", "--runs", "1", "--no-fixed"]


def _fp32(path: Path) -> float:
    (rec,) = [r for r in json.loads(path.read_text()) if r["format"] == "fp32"]
    return rec["value"]


def test_eval_loads_the_weights_into_the_tasks_model(tmp_path: Path, capsys) -> None:
    (tmp_path / "t.py").write_text(TASK)
    spec = f"{tmp_path}/t.py:make"
    # weights that make class 0 win everywhere: top-1 100 % against the labels 0
    state = {"0.weight": torch.zeros(16, 8), "0.bias": torch.ones(16), "2.weight": torch.zeros(4, 16),
             "2.bias": torch.tensor([5.0, 0.0, 0.0, 0.0])}
    save_file(state, str(tmp_path / "w.safetensors"))
    assert main(["eval", "--task", spec, *GRID, "--json", str(tmp_path / "plain.json")]) == 0
    assert main(["eval", "--task", spec, *GRID, "--weights", str(tmp_path / "w.safetensors"),
                 "--json", str(tmp_path / "loaded.json")]) == 0
    assert _fp32(tmp_path / "loaded.json") == 100.0 and _fp32(tmp_path / "plain.json") < 100.0


def test_weights_that_do_not_fit_or_several_tasks_are_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "t.py").write_text(TASK)
    spec = f"{tmp_path}/t.py:make"
    save_file({"0.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    assert main(["eval", "--task", spec, *GRID, "--weights", str(tmp_path / "bad.safetensors")]) == 2
    assert "does not fit the model" in capsys.readouterr().err
    assert main(["eval", "--task", spec, "--task", spec, *GRID, "--weights", str(tmp_path / "bad.safetensors")]) == 2
    assert "give one --task" in capsys.readouterr().err
