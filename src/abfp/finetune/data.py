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

from torch import Tensor

from ..zoo import dlrm, fashion, unet3d
from ..zoo.base import Dataset

__all__ = ["TRAINABLE_TASKS", "training_data", "unlabelled_data"]

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
