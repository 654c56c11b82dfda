"""A tiny model and a learnable synthetic task for the finetuning tests (imported by conftest)."""

from __future__ import annotations

import torch
from torch import nn

from abfp.zoo.base import Dataset

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """conv(1->4, 3x3) -> [batch norm] -> ReLU -> dropout -> linear(4*6*6 -> 3)."""

    def __init__(self, dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=not batch_norm)  # batch norm cancels a bias
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        self.norm = nn.BatchNorm2d(4) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.norm(self.conv(x)))).flatten(1))


def make_data(n: int, seed: int) -> Dataset:
    """Images whose class is the strongest of three fixed templates."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(3, 36, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.flatten(1) @ templates.T).argmax(1)
    return Dataset((x,), y)
