"""A tiny classifier with a calibration split (so ``abfp tune``'s evaluation inputs are the
first samples of its data, as ``abfp eval --samples N`` takes them): a convolution and two
linear layers on seeded random inputs, scored by cosine similarity to float32 (a real-valued metric)."""

import torch
from torch import nn

from abfp.zoo.base import COSINE, Dataset, Task


class PlanTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv1d(2, 6, 5)
        self.fc1 = nn.Linear(6 * 12, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def make() -> Task:
    model = PlanTiny().eval()
    g = torch.Generator().manual_seed(6)
    x, xc = torch.randn(40, 2, 16, generator=g), torch.randn(24, 2, 16, generator=g)
    return Task("plan-tiny", "a tiny conv + MLP on random data", lambda: model, lambda: Dataset((x,)), COSINE,
                default_batch_size=16, load_calibration=lambda: Dataset((xc,)))
