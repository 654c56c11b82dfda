"""A tiny task (model, data, metric) for evaluation tests: loadable as tests/evaluate/tiny_task.py:make."""

import torch
from torch import nn

from abfp.zoo.base import TOP1, Dataset, Task

CALLS = {"forward": 0}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # K = 9: a depthwise layer
        self.fc = nn.Linear(4 * 6 * 6, 5)
        with torch.no_grad():  # every parameter from the seeded generator: make() is reproducible
            self.dw.weight.copy_(torch.randn(self.dw.weight.shape, generator=g))
            self.dw.bias.copy_(torch.randn(self.dw.bias.shape, generator=g))
            # positive weights on positive (ReLU) inputs: coherent sums, large tile products
            self.fc.weight.copy_(0.05 + 0.01 * torch.rand(self.fc.weight.shape, generator=g))
            self.fc.bias.copy_(torch.randn(self.fc.bias.shape, generator=g))

    def forward(self, x):
        CALLS["forward"] += 1
        return self.fc(torch.relu(self.dw(x)).flatten(1))


def make() -> Task:
    model = Tiny().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, 6, 6, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels = the float32 model's answers: fp32 accuracy is 100%
    return Task("tiny", "a tiny CNN on random data", lambda: model, lambda: Dataset((x,), y), TOP1,
                default_batch_size=32)
