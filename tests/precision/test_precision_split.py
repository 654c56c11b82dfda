"""``abfp precision`` learns its energies on inputs it does not score: a task without a training
split (a user's) learns on the first half of its data and is scored on the rest; it learned on
the very inputs its metric was then measured on (the learned allocation's saving was scored on
its own training data). Zoo tasks with a training split learn on it, as before for Fashion-MNIST."""

from __future__ import annotations

import pytest
import torch
from tiny_precision_task import make

from abfp import zoo
from abfp.finetune.data import training_data as finetune_training_data
from abfp.precision import PrecisionSettings, run_precision
from abfp.precision.experiment import precision_data


def test_a_task_without_a_training_split_learns_on_the_first_half() -> None:
    task = make()
    x = task.load_data().inputs[0]
    data, train, source = precision_data(task)
    assert train.inputs[0].equal(x[:32]) and data.inputs[0].equal(x[32:]) and "first samples" in source
    data, _, _ = precision_data(task, 10)
    assert data.inputs[0].equal(x[32:42])


def test_the_learning_sees_only_the_training_half(monkeypatch) -> None:
    import abfp.precision.experiment as experiment

    seen: list[tuple[torch.Tensor, ...]] = []
    real = experiment.shuffled_batches

    def spy(inputs, *args, **kwargs):  # the batches the energies learn from
        seen.append(inputs)
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(experiment, "shuffled_batches", spy)
    task = make()
    r = run_precision(task, PrecisionSettings(steps=2, batch_size=16, rel_tol=0.2, final_seeds=1))
    x = task.load_data().inputs[0]
    assert "first samples" in r["learning"]["data"]
    (learned_on,) = seen
    assert learned_on[0].equal(x[:32])


def test_a_zoo_task_with_a_training_split_learns_on_it() -> None:
    try:
        expected = finetune_training_data("fashion-cnn", None)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST training split not installed")
    data, train, source = precision_data(zoo.get("fashion-cnn"), 100)
    assert len(data) == 100 and train.inputs[0].equal(expected.inputs[0]) and "training split" in source
