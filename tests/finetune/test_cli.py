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
    ["--feature-weight", "-1"],
    ["--feature-weight", "nan"],
    ["--feature-modules", "blocks"],
    ["--feature-weight", "0.1", "--checkpoint", ""],  # fashion-cnn with its labels: cross entropy, not label-free
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
    # the same steps again: nothing left to train, said; the evaluation and outputs are redone
    assert main([*common, "--steps", "4", "--json", "again.json", "--checkpoint", "part.safetensors", "--resume"]) == 0
    again = json.loads(Path("again.json").read_text())
    assert again["metric_after"] == full["metric_after"] and again["resumed_from"] == 4


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("abfp: error:"), err
    return err[0]


def test_existing_outputs_are_refused_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    from abfp.finetune import cli as ft_cli
    from abfp.finetune import data

    def no_work(*a, **k):
        raise AssertionError("the training data was loaded before the outputs were checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "training_data", no_work)
    Path("c.safetensors").write_bytes(b"old checkpoint")
    Path("r.json").write_text("{}")
    base = ["finetune", "--no-progress", "--steps", "2"]
    assert main([*base, "--checkpoint", "c.safetensors"]) == 2
    line = _one_error_line(capsys)
    assert "c.safetensors" in line and "--resume" in line and "--force" in line
    assert main([*base, "--checkpoint", "", "--json", "r.json"]) == 2
    assert "r.json" in _one_error_line(capsys)
    assert main([*base, "--checkpoint", "", "--save-model", "r.json"]) == 2
    assert "--force" in _one_error_line(capsys)
    assert main([*base, "--checkpoint", "x.safetensors", "--json", "x.safetensors"]) == 2
    assert "same file" in _one_error_line(capsys)
    assert main([*base, "--checkpoint", "", "--json", "r.json/sub.json"]) == 2
    assert "is a file" in _one_error_line(capsys)
    assert Path("c.safetensors").read_bytes() == b"old checkpoint" and Path("r.json").read_text() == "{}"
    # --force lets the checks pass (nothing is written by the checks themselves)
    ns = type("A", (), dict(json_path="r.json", save_model=None, force=True, resume=False))()
    assert ft_cli.check_outputs(ns, "c.safetensors") is None


@pytest.mark.parametrize("content", [b"", b"garbage\n" * 10, b"\x08\x00\x00\x00\x00\x00\x00\x00{}\x00\x00"])
def test_damaged_checkpoint_is_one_line(content: bytes, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "bad.safetensors"
    ckpt.write_bytes(content)
    assert main(["finetune", "--no-progress", "--steps", "2", "--checkpoint", str(ckpt), "--resume"]) == 2
    line = _one_error_line(capsys)
    assert str(ckpt) in line and "damaged" in line


def test_resume_with_fewer_steps_than_the_checkpoint(tmp_path: Path, capsys) -> None:
    from ft_tiny import TinyNet

    from abfp.finetune.checkpoint import save_checkpoint

    model = TinyNet()
    ckpt = tmp_path / "six.safetensors"
    save_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()), 6, {}, {"threads": torch.get_num_threads()})
    assert main(["finetune", "--no-progress", "--steps", "3", "--checkpoint", str(ckpt), "--resume"]) == 2
    line = _one_error_line(capsys)
    assert "--steps 3" in line and "6 steps" in line and str(ckpt) in line
