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
