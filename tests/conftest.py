"""Every test starts from the same global RNG state: a failure reproduces exactly."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)
    yield
