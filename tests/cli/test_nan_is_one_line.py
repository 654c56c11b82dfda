"""A NaN where a number must be (a user's metric that returns NaN, a finetuning loss that blows
up) is one line on stderr and exit status 2, like other bad input: it was a Python traceback
(``FloatingPointError`` was not among the errors ``abfp`` prints)."""

from __future__ import annotations

from pathlib import Path

from abfp.cli import main

TASKS = '''import torch
from abfp.zoo.base import Metric


def nan_metric():
    torch.manual_seed(0)
    return (torch.nn.Linear(8, 4).eval(), torch.randn(32, 8),
            Metric("always nan", "fidelity", lambda out, labels, ref: float("nan")))


def plain():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 4).eval(), torch.randn(64, 8), "kl"
'''


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("abfp: error: "), err
    return err


def test_eval_of_a_metric_that_returns_nan(tmp_path: Path, capsys) -> None:
    path = tmp_path / "t.py"
    path.write_text(TASKS)
    assert main(["eval", "--task", f"{path}:nan_metric", "--cache-dir", "", "--no-progress", "--gains", "1",
                 "--tile-widths", "8", "--runs", "1", "--no-fixed"]) == 2
    assert "metric 'always nan'" in _one_line(capsys)


def test_finetune_whose_loss_blows_up(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "t.py"
    path.write_text(TASKS)
    assert main(["finetune", "--task", f"{path}:plain", "--method", "qat", "--loss", "mse", "--lr", "1e30",
                 "--steps", "30", "--batch-size", "8", "--validation-samples", "0", "--checkpoint", "",
                 "--no-progress", "--threads", "1"]) == 2
    assert "lower the learning rate" in _one_line(capsys)
