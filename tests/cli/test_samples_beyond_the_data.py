"""A sample count larger than the data is said, never silently clamped: one line on stderr per
option (``abfp: note: --samples 100 is more than the 12 samples in ...: using 12``) and the count
used in the JSON (``eval``, ``explore``); ``explore --screen K`` not fewer than the samples
evaluated runs no screen and says so (its JSON said ``"screen": K``)."""

from __future__ import annotations

import json

import pytest

from abfp.cli import main

TASK = """
import torch
from torch import nn
from abfp.zoo import Dataset

def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, Dataset((torch.randn(12, 8),), torch.randint(0, 3, (12,))), "top1"
"""


@pytest.fixture
def task(tmp_path):
    (tmp_path / "tiny_task.py").write_text(TASK)
    return f"{tmp_path / 'tiny_task.py'}:make"


def _notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("abfp: note:")]


def test_eval_says_samples_and_calibration_beyond_the_data(task, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--task", task, "--samples", "100", "--calibration-samples", "50", "--tile-widths", "8",
                 "--gains", "1", "--noise", "0", "--cache-dir", "", "--no-progress", "--json", str(out)]) == 0
    assert _notes(capsys.readouterr().err) == [  # a task file's name is its spec
        f"abfp: note: --samples 100 is more than the 12 samples in {task}'s data: using 12",
        "abfp: note: --calibration-samples 50 is more than the 12 samples evaluated: using 12"]
    assert {r["samples"] for r in json.loads(out.read_text())} == {12}


def test_eval_within_the_data_says_nothing(task, capsys):
    assert main(["eval", "--task", task, "--samples", "12", "--calibration-samples", "6", "--tile-widths", "8",
                 "--gains", "1", "--noise", "0", "--cache-dir", "", "--no-progress"]) == 0
    assert _notes(capsys.readouterr().err) == []


def test_explore_says_samples_energy_samples_and_a_screen_that_cannot_run(task, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert main(["explore", "--task", task, "--samples", "100", "--energy-samples", "50", "--screen", "20",
                 "--formats", "abfp", "--tile-widths", "8", "--gains", "1", "--dac-search", "none", "--noise", "0",
                 "--cache-dir", "", "--no-progress", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert _notes(captured.err) == [
        f"abfp: note: --samples 100 is more than the 12 samples in {task}'s data: using 12",
        "abfp: note: --energy-samples 50 is more than the 12 samples evaluated: using 12",
        "abfp: note: --screen 20 is not fewer than the 12 samples evaluated: no screen, every design is evaluated "
        "on all of them"]
    res = json.loads(out.read_text())
    assert res["samples"] == 12 and res["search"]["screen"] is None
    assert "screen on" not in captured.out


def test_finetune_says_evaluation_inputs_beyond_the_data(task, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its checkpoint folder
    out = tmp_path / "f.json"
    assert main(["finetune", "--model", task, "--method", "qat", "--steps", "1", "--batch-size", "2",
                 "--train-samples", "6", "--eval-samples", "500", "--no-progress", "--json", str(out)]) == 0
    assert _notes(capsys.readouterr().err) == [
        f"abfp: note: --eval-samples 500 is more than the 6 evaluation inputs of {task}: using 6"]
    assert json.loads(out.read_text())["eval_samples"] == 6


def test_tune_says_evaluation_gain_and_energy_samples_beyond_the_data(task, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["tune", "--task", task, "--json", str(out), "--calibration", "6", "--eval-samples", "500",
                 "--gain-samples", "50", "--energy-samples", "20", "--no-repeats", "--no-progress"]) == 0
    assert _notes(capsys.readouterr().err) == [
        f"abfp: note: --eval-samples 500 is more than the 6 evaluation samples of {task} (after the calibration "
        "samples): using 6",
        "abfp: note: --gain-samples 50 is more than the 6 calibration samples: using 6",
        "abfp: note: --energy-samples 20 is more than the 6 calibration samples: using 6"]


def test_energy_says_a_batch_beyond_the_data(task, capsys):
    assert main(["energy", "--batch-size", "100", "--task", task]) == 0
    assert _notes(capsys.readouterr().err) == [
        f"abfp: note: --batch-size 100 is more than the 12 samples in {task}'s data: using 12"]


def test_precision_says_evaluation_and_learning_samples_beyond_the_data(task, tmp_path, monkeypatch, capsys):
    """A user task learns on the first half of its data and is scored on the rest (6 and 6); the
    JSON's learning.batch_size is the batch used (it was the one asked)."""
    monkeypatch.chdir(tmp_path)  # its journal folder
    out = tmp_path / "p.json"
    assert main(["precision", "--task", task, "--eval-samples", "100", "--batch-size", "64", "--steps", "1",
                 "--quiet", "--search-seeds", "1", "--json", str(out)]) == 0
    notes = _notes(capsys.readouterr().err)
    assert notes[0] == f"abfp: note: --eval-samples 100 is more than the 6 evaluation samples in {task}'s data: using 6"
    assert notes[1].startswith("abfp: note: --batch-size 64 is more than the 6 learning samples (")
    assert notes[1].endswith("): using 6") and len(notes) == 2
    res = json.loads(out.read_text())
    assert res["learning"]["batch_size"] == 6 and res["search"]["eval_samples"] == 6


def test_dnf_says_a_calibration_batch_beyond_the_training_inputs(task, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its checkpoint folder
    assert main(["finetune", "--model", task, "--method", "dnf", "--steps", "1", "--batch-size", "2",
                 "--train-samples", "6", "--validation-samples", "0", "--calibration-samples", "64",
                 "--no-progress"]) == 0
    assert _notes(capsys.readouterr().err) == [
        "abfp: note: --calibration-samples 64 is more than the 6 training inputs: using 6"]
