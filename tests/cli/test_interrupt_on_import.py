"""Ctrl-C while the ``abfp`` command imports torch (seconds) or reads its command line ends it as
its other interrupts do: one line on stderr, exit status 130 (before: a traceback and death by
SIGINT, status -2). A program that imports abfp keeps its KeyboardInterrupt. The interrupt is a
stand-in ``torch`` package that raises KeyboardInterrupt when imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import abfp
from abfp import cli

SRC = str(Path(abfp.__file__).resolve().parents[1])
LINE = "abfp: interrupted (nothing was written)"


@pytest.fixture
def interrupting_torch(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), SRC]))
    return tmp_path, env


def _run(argv, env, cwd):
    return subprocess.run([sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("how", ["python -m abfp", "console script"])
def test_ctrl_c_while_the_command_imports_torch_is_one_line_and_130(interrupting_torch, how):
    tmp, env = interrupting_torch
    if how == "console script":  # what pip writes for [project.scripts] abfp = "abfp.cli:main"
        (tmp / "bin").mkdir()
        script = tmp / "bin" / "abfp"
        script.write_text("import sys\nfrom abfp.cli import main\nsys.exit(main())\n")
        argv = [str(script), "presets"]
    else:
        argv = ["-m", "abfp", "presets"]
    r = _run(argv, env, tmp)
    assert (r.returncode, r.stderr) == (130, LINE + "\n"), r.stderr


def test_a_program_importing_abfp_keeps_its_keyboard_interrupt(interrupting_torch):
    tmp, env = interrupting_torch
    r = _run(["-c", "import abfp"], env, tmp)
    assert r.returncode not in (0, 130) and "KeyboardInterrupt" in r.stderr


def test_ctrl_c_while_the_command_line_is_read_is_one_line_and_130(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["presets"]) == 130
    assert capsys.readouterr().err == LINE + "\n"
