"""Operands whose values the device cannot read are refused in words naming abfp, the product and
its module: a ``MaskedTensor`` (``TypeError``, as torch's products give one, but an unrelated one
came from inside the block scales) and a tensor on the meta device (before: "Tensor.item() cannot
be called on meta tensors"); nothing is counted."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.masked import masked_tensor

import abfp
from abfp import ABFPConfig

CFG = ABFPConfig(noise_std=0.0, tile_width=8)


@pytest.mark.parametrize("layer, shape", [(lambda: nn.Linear(4, 3), (2, 4)), (lambda: nn.Conv1d(2, 2, 1), (1, 2, 4))])
def test_a_masked_tensor_input_is_a_clear_type_error(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "MaskedTensor is in prototype stage"
        mt = masked_tensor(x, torch.rand(*shape) > 0.3)
    plain = nn.Sequential(layer())
    with pytest.raises(TypeError):
        plain(mt)  # torch refuses it too
    am = abfp.convert(plain, CFG)
    with pytest.raises(TypeError, match=r"abfp: \S*(linear|conv1d) \(module '0'\) has a MaskedTensor operand"):
        am(mt)
    assert abfp.coverage(am).analog_macs == 0


class Einsum(nn.Module):
    def forward(self, a, b):
        return torch.einsum("ij,jk->ik", a, b)


def test_a_masked_operand_of_an_einsum_is_named_before_the_family_reshapes_it():
    """The einsum family permutes its operands first: torch's own TypeError came from that permute."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mt = masked_tensor(torch.randn(3, 4), torch.rand(3, 4) > 0.3)
    with pytest.raises(TypeError, match=r"abfp: torch.einsum \(module 'the root'\) has a MaskedTensor operand"):
        abfp.convert(Einsum(), CFG)(mt, torch.randn(4, 5))


@pytest.mark.parametrize("where", ["input", "model", "both"])
def test_a_meta_operand_is_a_clear_error(where):
    model = nn.Sequential(nn.Linear(4, 3))
    am = abfp.convert(model.to("meta") if where != "input" else model, CFG)
    x = torch.randn(2, 4, device="cpu" if where == "model" else "meta")
    with pytest.raises(NotImplementedError, match=r"abfp: product 0:linear0 \(module '0'\) has an operand on the meta "
                                                  "device"):
        am(x)
    assert abfp.coverage(am).analog_macs == 0
