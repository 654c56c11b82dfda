"""``abfp finetune``: bad input is one line and exit status 2; --json, checkpoints and --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from abfp.cli import main
from abfp.finetune.checkpoint import load_checkpoint
from abfp.finetune.data import training_data

try:
    training_data("fashion-cnn", 64)
    HAVE_TRAIN = True
except FileNotFoundError:
    HAVE_TRAIN = False


@pytest.mark.parametrize("argv", [
    ["--steps", "0"],
    ["--lr", "-1"],
    ["--batch-size", "0"],
    ["--model", "no-such-model"],
    ["--model", "mnist-cnn"],
    ["--method", "qat", "--per-channel"],
    ["--method", "qat", "--refresh-every", "5"],
    ["--layer-fraction", "1.5"],
    ["--refresh-every", "-1"],
    ["--tile-width", "0"],
    ["--noise", "-0.1"],
    ["--preset", "no-such-preset"],
    ["--config", "{not json"],
    ["--eval-samples", "0"],
    ["--train-samples", "10", "--batch-size", "64"],
    ["--checkpoint", "", "--resume"],
])
def test_bad_input_exits_2(argv, capsys) -> None:
    assert main(["finetune", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("abfp: error:")


def test_unknown_method_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--method", "sgd"])
    assert e.value.code == 2


@pytest.mark.skipif(not HAVE_TRAIN, reason="Fashion-MNIST training data (dataset-fashion-mnist) not installed")
def test_json_checkpoint_and_resume(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    common = ["finetune", "--no-progress", "--train-samples", "128", "--batch-size", "16", "--eval-samples", "40",
              "--calibration-samples", "16", "--sampler", "eager", "--checkpoint-every", "2", "--lr", "1e-3"]
    assert main([*common, "--steps", "4", "--json", "full.json", "--checkpoint", "full.safetensors"]) == 0
    full = json.loads(Path("full.json").read_text())
    for key in ("method", "fp32_metric", "metric_before", "metric_after", "steps", "seconds_per_step",
                "seconds_total", "fp32_seconds_per_step"):
        assert key in full
    assert full["method"] == "dnf" and full["steps"] == 4

    # a run that stopped after its step-2 checkpoint, then resumed to 4 steps
    assert main([*common, "--steps", "2", "--checkpoint", "part.safetensors"]) == 0
    assert main([*common, "--steps", "4", "--json", "resumed.json", "--checkpoint", "part.safetensors", "--resume"]) == 0
    resumed = json.loads(Path("resumed.json").read_text())
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4
    assert resumed["metric_after"] == full["metric_after"] and resumed["final_loss"] == full["final_loss"]
    a, _ = load_checkpoint("full.safetensors")
    b, _ = load_checkpoint("part.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))

    # resuming with other settings is refused with exit status 2
    assert main([*common, "--steps", "4", "--lr", "5e-4", "--checkpoint", "part.safetensors", "--resume"]) == 2
