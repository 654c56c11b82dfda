"""A converted model follows its weights however they change: the encoded weights it caches are
never served once the weights they encode have changed (in place, by an optimizer step of any
kind, by ``load_state_dict``, pruning, a dtype change)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import abfp
import abfp.functional as AF
from abfp import ABFPConfig

# coarse, noise-free converters: every weight change is visible in the device result
COARSE = ABFPConfig(noise_std=0.0, input_bits=4, weight_bits=4, output_bits=6, gain=1.0, tile_width=8)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _expected(m: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The device result of ``m``'s current weights, encoded afresh (``cache=False``)."""
    with torch.no_grad():
        h = torch.relu(AF.conv2d(x, m[0].weight, m[0].bias, padding=1, config=COARSE, cache=False)).flatten(1)
        return AF.linear(h, m[3].weight, m[3].bias, config=COARSE, cache=False)


X = torch.randn(2, 3, 6, 6)


def _loss_step(opt: torch.optim.Optimizer, m: nn.Module) -> None:
    opt.zero_grad()
    F.mse_loss(m(X), torch.zeros(2, 5)).backward()
    opt.step()


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.5),
    lambda ps: torch.optim.SGD(ps, lr=0.5, fused=True),
    lambda ps: torch.optim.Adam(ps, lr=0.1),
    lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=True),
    lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),
], ids=["sgd", "sgd-fused", "adam", "adam-foreach", "adam-fused", "adamw-fused"])
def test_the_next_forward_after_an_optimizer_step_uses_the_new_weights(make):
    """A fused step leaves the parameters' version counters as they were (torch 2.13): before
    the step hook forgot the stepped parameters' encodings, the next forward ran on the weights
    of before the step (QAT with ``fused=True`` trained against stale weights)."""
    m = abfp.convert(_model(), COARSE)
    opt = make(m.parameters())
    for _ in range(2):
        _loss_step(opt, m)
        with torch.no_grad():
            assert torch.equal(m(X), _expected(m, X))


class DataSGD(torch.optim.Optimizer):
    """An optimizer written the old way: it updates ``p.data`` (no version bump)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, dict(lr=lr))

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad.data, alpha=-group["lr"])


def test_an_optimizer_that_writes_through_data_is_followed_too():
    m = abfp.convert(_model(), COARSE)
    opt = DataSGD(m.parameters(), lr=0.5)
    _loss_step(opt, m)
    with torch.no_grad():
        assert torch.equal(m(X), _expected(m, X))


def _mul_no_grad(m):
    with torch.no_grad():
        m[0].weight.mul_(2)
        m[3].weight.mul_(-1)


def _load(m):
    torch.manual_seed(5)
    m.load_state_dict(_model().state_dict() | {"3.weight": torch.randn(5, 144)})


def _prune(m):
    import torch.nn.utils.prune as prune
    prune.l1_unstructured(m[3], "weight", 0.5)
    prune.l1_unstructured(m[0], "weight", 0.5)


def _init(m):
    nn.init.normal_(m[3].weight)
    nn.init.kaiming_uniform_(m[0].weight)


@pytest.mark.parametrize("edit", [_mul_no_grad, _load, _prune, _init], ids=["no_grad-mul", "load_state_dict", "prune",
                                                                          "nn.init"])
def test_a_weight_edited_after_a_forward_is_re_encoded(edit):
    m = abfp.convert(_model(), COARSE)
    with torch.no_grad():
        before = m(X)
    edit(m)
    with torch.no_grad():
        after = m(X)
    assert not torch.equal(before, after)
    assert torch.equal(after, _expected(m, X))


@pytest.mark.parametrize("n", [128, 300])
def test_a_weight_whose_data_is_replaced_at_the_same_address_is_re_encoded(n):
    """``w.data = ...`` keeps the version counter; the allocator often hands the new storage the
    freed one's address (here: two replacements in a row, the middle storage freed before the
    last is made), and the cache keyed on the address served the encoding of the old values."""
    torch.manual_seed(0)
    m = abfp.convert(nn.Linear(n, n), COARSE)
    x = torch.randn(3, n)
    with torch.no_grad():
        m(x)
        m.weight.data = m.weight.data * 0 + 1
        m.weight.data = m.weight.data.clone() * 2
        assert torch.equal(m(x), AF.linear(x, m.weight, m.bias, config=COARSE, cache=False))
