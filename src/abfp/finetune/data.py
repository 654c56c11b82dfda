"""Training data for the zoo tasks that can be finetuned.

``fashion-cnn`` and ``fashion-vit`` train on the 60,000-image Fashion-MNIST training split
(the Debian package ``dataset-fashion-mnist``, read and normalised by :mod:`abfp.zoo.fashion`);
so does ``fashion-lstm``, which reads the same images row by row. ``unet3d`` and ``dlrm`` train on
their generated training splits (other seeds than their test data). Tasks with a calibration
split (``Task.load_calibration``: ``efficientnet-lite0``, ``minilm-l6``) finetune label-free on it
(:func:`unlabelled_data`), never on their evaluation inputs.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor

from ..zoo import dlrm, fashion, unet3d
from ..zoo.base import Dataset

__all__ = ["TRAINABLE_TASKS", "training_data", "unlabelled_data", "split_task_data"]

#: Zoo tasks with a known training set.
TRAINABLE_TASKS = ("fashion-cnn", "fashion-vit", "fashion-lstm", "unet3d", "dlrm")

#: Tasks whose training split is generated: ``samples -> Dataset``.
_GENERATED = {"unet3d": unet3d.training_data, "dlrm": dlrm.training_data}


def training_data(task: str, samples: int | None = None) -> Dataset:
    """The training split of zoo task ``task`` (its first ``samples`` images when given).

    Raises ``ValueError`` for a task without a known training set and ``FileNotFoundError``
    when the data is not installed.
    """
    if task not in TRAINABLE_TASKS:
        raise ValueError(f"no training data known for task {task!r}; finetuning supports {', '.join(TRAINABLE_TASKS)}")
    if samples is not None and samples < 1:
        raise ValueError(f"number of training samples must be positive, got {samples}")
    if task in _GENERATED:
        return _GENERATED[task](samples)
    images, labels = _raw_train_split()
    if samples is not None:
        images, labels = images[:samples], labels[:samples]
    return Dataset((fashion.normalize(images),), labels)


@functools.lru_cache(maxsize=1)
def _raw_train_split() -> tuple[Tensor, Tensor]:
    """The uint8 training images and labels, read once per process (47 MB)."""
    return fashion.load_split("train")


def unlabelled_data(task: str, samples: int | None = None) -> Dataset:
    """Inputs for label-free finetuning of zoo task ``task`` (its first ``samples``): the
    task's calibration split when it has one, else the inputs of its training split.

    Raises ``ValueError`` for a task with neither."""
    from .. import zoo

    t = zoo.get(task)
    if t.load_calibration is not None:
        data = t.load_calibration()
        if samples is not None:
            if samples < 1:
                raise ValueError(f"number of training samples must be positive, got {samples}")
            data = data.take(samples)
        return Dataset(data.inputs)
    if task in TRAINABLE_TASKS:
        return Dataset(training_data(task, samples).inputs)
    raise ValueError(f"no calibration or training inputs known for task {task!r}")


def split_task_data(task: Any, calibration: int | None, eval_samples: int | None, *,
                    at_most: bool = False) -> tuple[Dataset, Dataset, str]:
    """``(calibration Dataset, evaluation Dataset, where the calibration came from)`` of any task
    (zoo or user): never overlapping.

    The task's calibration split (``Task.load_calibration``) when it has one, else its training
    split (the zoo's trainable tasks, labels kept for a label metric), else the first
    ``calibration`` samples of its data; evaluation is the task's data (after those samples in
    the last case), its first ``eval_samples`` when given. ``calibration=None``: all of the
    calibration split, or half of the data. ``at_most``: ``calibration`` is a default, not a
    request: a smaller calibration split is used whole, and data without one gives at most half
    of its samples. Raises ``ValueError`` when too few samples are left."""
    data = task.load_data()
    if task.load_calibration is not None or task.name in TRAINABLE_TASKS:
        if task.load_calibration is not None:
            calib, source = task.load_calibration(), "the task's calibration split"
        else:
            calib, source = training_data(task.name, calibration), "the task's training split"
        if calibration is not None and len(calib) < calibration and not at_most:
            raise ValueError(f"{task.name}'s calibration data has {len(calib)} samples")
        return calib.take(calibration), data.take(eval_samples), source
    if calibration is None:
        calibration = len(data) // 2
    elif at_most:
        calibration = min(calibration, len(data) // 2)
    if not 1 <= calibration < len(data):
        raise ValueError(f"{task.name} has {len(data)} samples; leave some to evaluate")
    end = len(data) if eval_samples is None else min(len(data), calibration + eval_samples)
    tg = data.targets
    calib = Dataset(tuple(t[:calibration] for t in data.inputs), None if tg is None else tg[:calibration])
    evald = Dataset(tuple(t[calibration:end] for t in data.inputs), None if tg is None else tg[calibration:end])
    return calib, evald, "the first samples of the task's data (it has no calibration split)"
