"""A tiny labelled task for the precision tests (loadable as ``tiny_precision_task:make``)."""

import torch
from torch import nn

from abfp.zoo.base import TOP1, Dataset, Task


def build() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6),
                          nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def make() -> Task:
    model = build()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, 5, 5, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # the float32 model scores 100 %
    return Task("tiny-precision", "a tiny CNN on random data", lambda: model, lambda: Dataset((x,), y), TOP1,
                default_batch_size=32)
