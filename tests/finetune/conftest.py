"""Fixtures of the finetuning tests: a tiny model, a learnable synthetic task, a noisy device."""

from __future__ import annotations

import pytest
import torch
from ft_tiny import TinyNet, make_data
from torch import nn

from abfp import ABFPConfig
from abfp.zoo.base import Dataset

torch.set_num_threads(1)


@pytest.fixture
def tiny_model() -> nn.Module:
    return TinyNet().eval()


@pytest.fixture
def tiny_train() -> Dataset:
    return make_data(256, 1)


@pytest.fixture
def tiny_eval() -> Dataset:
    return make_data(128, 2)


@pytest.fixture
def tiny_config() -> ABFPConfig:
    # small tiles, gain 1 and a noisy ADC: a clearly visible device error
    return ABFPConfig(tile_width=8, gain=1.0, noise_std=0.5, seed=3)
