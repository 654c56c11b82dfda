"""Top-1 accuracy refuses labels that are not class indices of the model's outputs: float values
(regression targets, probabilities) and indices outside ``0..C-1`` never equal an arg-max, and
``abfp eval`` printed a silent 0 % (or too low an accuracy) for a user's task with such labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abfp.cli import main
from abfp.zoo.base import TOP1

OUT = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.7], [0.3, 0.3, 0.4]])


@pytest.mark.parametrize("labels,message", [
    (torch.tensor([0.37, 1.0, 2.0, 2.0]), "needs class indices as labels, got torch.float32 values such as 0.37"),
    (torch.tensor([1.0, 0.0, float("nan"), 2.0]), "values such as nan"),
    (torch.tensor([1, 0, 3, 2]), "label 3 is not a class of the model's 3 outputs"),
    (torch.tensor([1, -100, 2, 2]), "label -100 is not a class"),
    (torch.tensor([True, False, True, True]), "integer class indices as labels, got torch.bool"),
    # one-hot labels (as for a BCE/MSE training loss): the fix is named
    (torch.nn.functional.one_hot(torch.tensor([1, 0, 2, 2]), 3).float(), r"one-hot or probability labels\? pass "
                                                                         r"labels.argmax\(-1\)"),
    (torch.tensor([[1, 0], [2, 2]]), "would broadcast"),
])
def test_labels_that_are_not_class_indices_are_refused(labels, message):
    with pytest.raises(ValueError, match=message):
        TOP1(OUT, labels, OUT)


def test_class_indices_of_any_integral_dtype_are_scored():
    # arg-max 1, 0, 2, 2
    assert TOP1(OUT, torch.tensor([1, 0, 2, 0]), OUT) == 75.0
    assert TOP1(OUT, torch.tensor([1.0, 0.0, 2.0, 0.0]), OUT) == 75.0  # labels loaded as floats
    assert TOP1(OUT, torch.tensor([1, 0, 2, 2], dtype=torch.uint8), OUT) == 100.0


def test_eval_of_a_user_task_with_float_labels_says_so(tmp_path: Path, capsys):
    (tmp_path / "t.py").write_text("import torch\n\ndef make():\n    torch.manual_seed(0)\n"
                                   "    return torch.nn.Linear(6, 4), (torch.randn(12, 6), torch.rand(12)), 'top1'\n")
    assert main(["eval", "--task", f"{tmp_path}/t.py:make", "--cache-dir", "", "--no-progress", "--gains", "1",
                 "--tile-widths", "8", "--runs", "1"]) == 2
    assert "needs class indices as labels" in capsys.readouterr().err
