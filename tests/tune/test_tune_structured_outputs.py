"""``abfp tune`` on a model whose forward returns a tuple, a list, a dict or a Hugging Face style
output scores the same tensor ``abfp eval`` does (the first, or ``logits``) in every stage: the
energy rule's sensitivities called the metric on the raw output and failed with ``AttributeError:
'tuple' object has no attribute 'dim'`` (the default error rule worked). And a user's task too small
to distil on is refused before any stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abfp.cli import main

TASK = '''import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.kind = nn.Linear(12, 24), nn.Linear(24, 5), kind

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        y = self.fc2(h)
        return {"tuple": (y, h), "list": [y, h], "dict": {"logits": y, "hidden": h}, "plain": y}[self.kind]


def make(kind):
    return Net(kind), torch.randn(48, 12, generator=torch.Generator().manual_seed(1)), "agreement"


def tuple_out(): return make("tuple")
def list_out(): return make("list")
def dict_out(): return make("dict")
def plain(): return make("plain")
'''


@pytest.mark.parametrize("func", ["tuple_out", "list_out", "dict_out"])
def test_the_energy_rule_scores_the_first_output_like_eval(func, tmp_path: Path, capsys):
    (tmp_path / "t.py").write_text(TASK)
    plans = {}
    for f in (func, "plain"):
        argv = ["tune", "--task", f"{tmp_path}/t.py:{f}", "--json", str(tmp_path / f / "plan.json"), "--no-progress",
                "--gain-rule", "energy", "--refine", "1", "--energy-budget", "1.5"]
        assert main(argv) == 0, capsys.readouterr().err
        plans[f] = json.loads((tmp_path / f / "plan.json").read_text())
    # the same network scored on the same tensor: the same plan and stage metrics as the plain model
    assert plans[func]["modules"] == plans["plain"]["modules"]
    assert [s["metric"] for s in plans[func]["info"]["stages"]] == [s["metric"] for s in plans["plain"]["info"]["stages"]]


def test_distillation_on_one_calibration_input_is_refused_before_any_stage(tmp_path: Path, capsys):
    """A task of 3 samples has 1 calibration input: ``--finetune distil-qat`` ran the gain and
    repeats stages, then failed, leaving a journal that refused the next run."""
    (tmp_path / "t.py").write_text(TASK.replace("torch.randn(48, 12", "torch.randn(3, 12"))
    out = tmp_path / "o"
    argv = ["tune", "--task", f"{tmp_path}/t.py:plain", "--json", str(out / "plan.json"), "--no-progress",
            "--finetune", "distil-qat", "--finetune-steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "finetuning (distil-qat) needs at least 2 calibration inputs, got 1" in err, err
    assert not out.exists() or not list(out.iterdir())  # no journal, no stage run
    assert main(argv[:-4] + ["--finetune", "bias-correct"]) == 0  # one input is enough to measure a bias
