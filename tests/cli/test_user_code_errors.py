"""An error of the user's own code (a task's ``make()``, a model's ``forward``) that ``abfp`` prints
as one line (a ``ValueError``, ``TypeError``, ...) says where it came from: the file, line and
function of the user's code, not only its message, which alone gave no clue that it was theirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from abfp.cli import main

TASKS = '''import json
import torch


def make_fails():
    raise ValueError("bad shard")


class Net(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc, self.how = torch.nn.Linear(4, 3), how

    def forward(self, x):
        if self.how == "own":
            raise ValueError("forward wants two inputs")
        json.loads("{")  # a library the forward calls raises (json.JSONDecodeError, a ValueError)


def forward_fails():
    return Net("own"), torch.randn(8, 4), "agreement"


def library_fails():
    return Net("library"), torch.randn(8, 4), "agreement"
'''


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("func,needle,how,where", [
    ("make_fails", 'raise ValueError("bad shard")', "raised in", "make_fails"),
    ("forward_fails", 'raise ValueError("forward wants', "raised in", "forward"),
    ("library_fails", 'json.loads("{")', "from", "forward"),
])
def test_a_user_error_names_its_file_line_and_function(tmp_path: Path, capsys, func, needle, how, where):
    path = tmp_path / "mytasks.py"
    path.write_text(TASKS)
    assert main(["eval", "--task", f"{path}:{func}", "--cache-dir", "", "--no-progress", "--gains", "1",
                 "--tile-widths", "8", "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("abfp: error: "), err
    assert f"{how} your code at {path}:{_line(TASKS, needle)}, in {where})" in err, err


def test_abfps_own_errors_get_no_location(capsys):
    assert main(["eval", "--task", "no-such-task", "--cache-dir", ""]) == 2
    err = capsys.readouterr().err
    assert "unknown zoo task" in err and "your code" not in err
