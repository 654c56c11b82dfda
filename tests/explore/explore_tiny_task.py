"""A tiny task for the explorer's tests: loadable as tests/explore/explore_tiny_task.py:make.

A two-layer MLP (reduction 64, so tile widths 8 and 32 differ) on seeded random inputs whose
labels are the float32 model's own answers (float32 accuracy 100 %). ``ANALOG_PASSES`` counts
forward passes of the model while it is converted (the work the cache saves).
"""

import torch
from torch import nn

from abfp.zoo.base import TOP1, Dataset, Task


class ExploreTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def make() -> Task:
    model = ExploreTiny().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(48, 64, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return Task("explore-tiny", "a tiny MLP on random data", lambda: model, lambda: Dataset((x,), y), TOP1,
                default_batch_size=48)
