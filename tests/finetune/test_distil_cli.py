"""``abfp finetune --loss``: label-free runs end to end (fashion-cnn's images without labels);
bad loss options are one line and exit status 2."""

from __future__ import annotations

import json

import pytest

from abfp.cli import main
from abfp.finetune.data import training_data

try:
    training_data("fashion-cnn", 64)
    HAVE_TRAIN = True
except FileNotFoundError:
    HAVE_TRAIN = False


@pytest.mark.parametrize("argv,message", [
    (["--model", "efficientnet-lite0", "--loss", "ce"], "has no labels"),
    (["--model", "minilm-l6", "--loss", "ce"], "has no labels"),
    (["--loss", "mse", "--temperature", "2"], "--temperature only applies"),
    (["--loss", "kl", "--temperature", "0"], "--temperature must be > 0"),
    (["--loss", "hinge"], "invalid choice"),
])
def test_bad_loss_options_exit_2(argv, message, capsys) -> None:
    try:
        code = main(["finetune", "--no-progress", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and len([line for line in err if line.startswith("abfp")]) == 1


@pytest.mark.skipif(not HAVE_TRAIN, reason="Fashion-MNIST training split not installed")
def test_label_free_cli_run(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    ck = tmp_path / "c.safetensors"
    code = main(["finetune", "--model", "fashion-cnn", "--loss", "kl", "--temperature", "2", "--method", "qat",
                 "--steps", "2", "--batch-size", "16", "--train-samples", "32", "--eval-samples", "32",
                 "--checkpoint", str(ck), "--json", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    rec = json.loads(out.read_text())
    assert rec["loss"] == "kl" and rec["temperature"] == 2.0 and rec["metric"] == "top-1 accuracy"
    # resuming with another loss is refused before any training
    assert main(["finetune", "--model", "fashion-cnn", "--loss", "mse", "--method", "qat", "--steps", "3",
              "--batch-size", "16", "--train-samples", "32", "--eval-samples", "32", "--checkpoint", str(ck),
              "--resume", "--no-progress", "--threads", "1"]) == 2
    assert "loss.loss: checkpoint 'kl' vs now 'mse'" in capsys.readouterr().err


TINY = "tests/evaluate/tiny_task.py:make"  # 96 labelled samples, no calibration split


@pytest.mark.parametrize("method", ["qat", "dnf"])
def test_user_task_finetunes_label_free_on_the_first_half(method, tmp_path, monkeypatch) -> None:
    from abfp import zoo
    from abfp.finetune.data import split_task_data

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    root = __file__.rsplit("/tests/", 1)[0]
    code = main(["finetune", "--task", f"{root}/{TINY}", "--method", method, "--steps", "3", "--batch-size", "16",
                 "--json", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    rec = json.loads(out.read_text())
    # label-free (kl for a percentage metric), trained on samples 0-38, validated on 39-47 (the best
    # weights kept: --validation-samples, a fifth by default), evaluated on 48-95
    assert rec["loss"] == "kl" and rec["train_samples"] == 39 and rec["validation_samples"] == 9
    assert rec["fp32_metric"] == 100.0
    # the default checkpoint is named after the task with the path's separators replaced
    (ck,) = (tmp_path / ".abfp_finetune").iterdir()
    assert ck.name.endswith(f"_tests_evaluate_tiny_task.py_make-{method}-kl.safetensors") and "/" not in ck.name[:-1]
    task = zoo.get(f"{root}/{TINY}")
    train, evald, source = split_task_data(task, None, None)
    x = task.load_data().inputs[0]
    assert len(train) == len(evald) == 48 and "first samples" in source
    assert train.inputs[0].equal(x[:48]) and evald.inputs[0].equal(x[48:])
    train, evald, _ = split_task_data(task, 40, 10)
    assert evald.inputs[0].equal(x[40:50])


@pytest.mark.parametrize("argv,message", [
    (["--train-samples", "96"], "has 96 samples; leave some to evaluate"),
    (["--loss", "cosine", "--temperature", "2"], "--temperature only applies"),
    (["--task", "/no/such/file.py:make"], "no such file"),
    (["--validation-samples", "40"], "--validation-samples 40 leaves 8 of the 48 training inputs"),
    (["--validation-samples", "-1"], "--validation-samples must be >= 0"),
    (["--validation-samples", "0", "--validate-every", "5"], "--validate-every does not apply here"),
    (["--validate-every", "0"], "--validate-every must be >= 1"),
])
def test_user_task_bad_options_exit_2(argv, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    root = __file__.rsplit("/tests/", 1)[0]
    code = main(["finetune", "--task", f"{root}/{TINY}", "--batch-size", "16", "--no-progress", *argv])
    assert code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / ".abfp_finetune").exists()
