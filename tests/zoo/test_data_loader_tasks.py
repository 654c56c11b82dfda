"""A user's task may hand its data over as a ``DataLoader`` (or a generator of batches), the form
most training code already has: it was refused ('data must be an abfp.zoo.Dataset, ...; got
DataLoader'). The batches are concatenated once; ambiguous batches are refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from abfp import zoo
from abfp.cli import main
from abfp.zoo.base import Dataset

X = torch.arange(40.0).reshape(10, 4)
Y = torch.arange(10) % 3


def test_a_loader_of_inputs_and_labels_is_concatenated_in_order():
    d = Dataset.from_batches(DataLoader(TensorDataset(X, Y), batch_size=4))  # batches of 4, 4, 2
    assert d.inputs[0].equal(X) and d.targets.equal(Y)
    unlabelled = Dataset.from_batches(DataLoader(TensorDataset(X), batch_size=3))  # one-item lists
    assert unlabelled.inputs[0].equal(X) and unlabelled.targets is None


def test_a_generator_of_several_inputs_and_targets():
    d = Dataset.from_batches(((X[i:i + 5], X[i:i + 5] * 2), Y[i:i + 5]) for i in (0, 5))
    assert len(d.inputs) == 2 and d.inputs[1].equal(2 * X) and d.targets.equal(Y)


@pytest.mark.parametrize("batches,message", [
    ([(X, X, Y)], "batch 0 of the data loader is a tuple of 3 items"),
    ([{"x": X}], "batch 0 of the data loader is a dict of 1 items"),
    ([(X[:5], Y[:5]), X[5:]], "batch 1 has 1 inputs and no target; the first had 1 and a target"),
    ([], "yielded no batches"),
])
def test_ambiguous_or_empty_batches_are_refused(batches, message):
    with pytest.raises(ValueError, match=message):
        Dataset.from_batches(iter(batches))


def test_a_user_task_returning_a_loader_evaluates(tmp_path: Path, capsys):
    (tmp_path / "t.py").write_text(
        "import torch\nfrom torch.utils.data import DataLoader, TensorDataset\n\n"
        "def make():\n    torch.manual_seed(0)\n    x, y = torch.randn(24, 6), torch.randint(0, 4, (24,))\n"
        "    return torch.nn.Linear(6, 4), DataLoader(TensorDataset(x, y), batch_size=8), 'top1'\n")
    task = zoo.get(f"{tmp_path}/t.py:make")
    data = task.load_data()
    assert len(data) == 24 and data.targets is not None
    assert main(["eval", "--task", f"{tmp_path}/t.py:make", "--cache-dir", "", "--no-progress", "--gains", "1",
                 "--tile-widths", "8", "--runs", "1", "--no-fixed"]) == 0
    assert "device MAC share" in capsys.readouterr().out
