"""``abfp precision`` and ``abfp energy``: bad input exits 2 with one line; good input writes JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from abfp.cli import main

sys.path.insert(0, str(Path(__file__).parent))


@pytest.mark.parametrize("argv", [
    ["precision", "--target-drop", "-1"],
    ["precision", "--steps", "0"],
    ["precision", "--lr", "0"],
    ["precision", "--lam", "-3"],
    ["precision", "--task", "no-such-task"],
    ["precision", "--plot", "out.pdf"],
    ["energy", "--task", "no-such-task"],
    ["energy", "--preset", "no-such-preset"],
    ["energy", "--params", '{"adc": -1}'],
    ["energy", "--params", '{"unknown": 1}'],
    ["energy", "--batch-size", "0"],
    ["energy", "--preset", "default", "--config", "{}"],
])
def test_bad_input_exits_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("abfp: error:")


def test_noise_choices_match_the_models():
    from abfp.noise import NOISE_NAMES
    from abfp.precision.cli import NOISE_CHOICES

    assert NOISE_CHOICES == NOISE_NAMES


def test_bad_choice_exits_2():
    with pytest.raises(SystemExit) as e:
        main(["precision", "--noise", "pink"])
    assert e.value.code == 2


def test_energy_command_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["energy", "--task", "fashion-cnn", "--preset", "abfp-888-n32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "features.0:conv0" in text and "2.83x" in text
    d = json.loads(out.read_text())
    assert d["samples"] == 1 and d["config"]["tile_width"] == 32
    assert d["per_inference"]["macs"] == sum(layer["macs"] for layer in d["layers"])


def test_precision_command_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["precision", "--task", "tiny_precision_task:make", "--noise", "shot", "--steps", "5", "--batch-size",
            "16", "--target-drop", "20", "--rel-tol", "0.2", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    d = json.loads(out.read_text())
    assert d["noise"] == "shot" and d["target_metric"] == pytest.approx(80.0)
    assert {"uniform_energy", "learned_energy", "energy_saving", "layers"} <= set(d)
    assert out.with_suffix(".png").exists()


def test_precision_takes_no_progress_as_the_other_commands_do() -> None:
    from abfp.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["precision", "--task", "fashion-cnn", "--no-progress"]).quiet is True
    assert parse(["precision", "--task", "fashion-cnn", "--quiet"]).quiet is True
    assert parse(["precision", "--task", "fashion-cnn"]).quiet is False
