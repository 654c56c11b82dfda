"""``torch.utils.checkpoint`` around a converted model: the recomputation sees the forward's device
noise (torch's global generator, which checkpoint restores), or is refused in words (a seeded
noise stream, which has moved on since the forward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

import abfp
from abfp.nn import mode as abfp_mode
from abfp import ABFPConfig

# gain 4 at 6-bit output: noisy, and some ADC samples clip, so noise shows in the gradients too
NOISY = ABFPConfig(tile_width=8, gain=4.0, output_bits=6)


def _model(seed: int | None) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 6))
    return abfp.convert(m, NOISY, execution=abfp.ExecutionOptions(seed=seed))


def _grads(m: nn.Module, x: torch.Tensor, use_checkpoint: bool, reentrant: bool) -> tuple[torch.Tensor, ...]:
    m.zero_grad()
    x = x.clone().requires_grad_()
    torch.manual_seed(7)
    y = checkpoint(m, x, use_reentrant=reentrant) if use_checkpoint else m(x)
    y.square().sum().backward()
    return (y.detach(), x.grad, m[0].weight.grad, m[2].weight.grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_an_unseeded_model_recomputes_with_the_forwards_noise(reentrant):
    m, x = _model(None), torch.randn(5, 16)
    plain = _grads(m, x, False, reentrant)
    again = _grads(m, x, True, reentrant)
    for a, b in zip(plain, again):
        assert torch.equal(a, b)
    torch.manual_seed(8)
    assert not torch.equal(m(x), plain[0])  # the noise is visible: another key gives another output


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_seeded_stream_is_refused_where_checkpoint_recomputes(reentrant):
    """Before: the recomputation drew the stream's next keys, and the gradients silently belonged
    to a forward that never produced the output. The refusal leaves no frame or mode behind."""
    m, x = _model(3), torch.randn(5, 16).requires_grad_()
    y = checkpoint(m, x, use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match=r"abfp: .*seeded noise stream \(seed=3\).*backward.*checkpoint.*seed=None"):
        y.sum().backward()
    assert not abfp_mode._stack() and not _get_current_function_mode_stack()
    with torch.no_grad():  # the model is usable afterwards and still draws from its stream
        abfp.reseed(m, 0)
        a = m(x)
        abfp.reseed(m, 0)
        assert torch.equal(a, m(x))


def test_a_seeded_noise_injector_is_refused_where_checkpoint_recomputes():
    """The noise injector (dynamic precision) draws from its own seeded streams (seed=0 by
    default); under checkpoint its recomputation drew other noise, silently. Without a seed it
    draws from torch's global generator, which checkpoint restores: the same gradients."""
    from abfp.noise import NoiseInjector

    x = torch.randn(5, 16)
    for seed in (0, None):
        torch.manual_seed(0)
        inj = NoiseInjector(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 6)), "shot", seed=seed)
        m = inj.model
        if seed is not None:
            y = checkpoint(inj, x.clone().requires_grad_(), use_reentrant=False)
            with pytest.raises(RuntimeError, match=r"abfp: a seeded noise stream \(seed=0\).*backward.*checkpoint"):
                y.sum().backward()
            continue
        grads = []
        for use in (False, True):
            m.zero_grad()
            torch.manual_seed(7)
            y = checkpoint(inj, x, use_reentrant=False) if use else inj(x)
            y.square().sum().backward()
            grads.append((y.detach(), m[0].weight.grad.clone()))
        assert all(torch.equal(a, b) for a, b in zip(*grads))
