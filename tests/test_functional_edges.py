"""Edges of abfp.functional: seeded noise streams, empty batches, bf16_io with a bias, and the
fixed-point scale of one call (never per chunk)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import abfp
import abfp.functional as AF
from abfp import ABFPConfig
from abfp.numerics import reference_product

NOISY = ABFPConfig(seed=5, noise_std=0.5, tile_width=16, gain=2.0)


# ----------------------------------------------------------------------------- noise streams
@pytest.mark.parametrize("dist", ["uniform", "gaussian"])
def test_seeded_functional_calls_draw_new_noise_and_reseed_repeats(dist):
    cfg = NOISY.replace(noise_dist=dist)
    x, w = torch.randn(6, 40), torch.randn(8, 40)
    abfp.reseed()
    first = [AF.linear(x, w, config=cfg) for _ in range(3)]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    abfp.reseed()  # the same sequence of calls after a restart: the same numbers
    assert all(torch.equal(a, AF.linear(x, w, config=cfg)) for a in first)
    AF.reseed(3)  # another offset: other numbers
    assert not torch.equal(first[0], AF.linear(x, w, config=cfg))


def test_seeded_functional_calls_draw_what_a_converted_model_draws():
    """One stream policy: a sequence of functional products with a seed equals a converted
    model making the same products after reseeding both with the same offset."""
    m = nn.Sequential(nn.Linear(40, 12), nn.ReLU(), nn.Linear(12, 4))
    am = abfp.convert(m, NOISY)
    x = torch.randn(5, 40)
    for offset in (0, 7):
        abfp.reseed(am, offset)
        abfp.reseed(offset=offset)
        with torch.no_grad():
            got = am(x)
            want = AF.linear(torch.relu(AF.linear(x, m[0].weight, m[0].bias, config=NOISY)),
                             m[2].weight, m[2].bias, config=NOISY)
        assert torch.equal(got, want)


def test_chunks_of_one_seeded_convolution_do_not_repeat_noise(monkeypatch):
    """Identical images in chunks of one call (the path with gradients builds patches a few
    images at a time) must not get identical noise."""
    monkeypatch.setattr(AF, "_IM2COL_ELEMENTS", 8 * 8 * 3 * 9)  # one image per chunk
    img = torch.randn(1, 3, 8, 8)
    x = img.expand(4, 3, 8, 8).clone().requires_grad_(True)
    w = torch.randn(4, 3, 3, 3)
    y = AF.conv2d(x, w, padding=1, config=NOISY.replace(tile_width=8))
    assert not any(torch.equal(y[0], y[i]) for i in range(1, 4))


# ----------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("kernel", ["auto", "reference"])
@pytest.mark.parametrize("grad", [False, True])
def test_empty_batches_give_empty_outputs_of_the_right_shape(kernel, grad):
    cfg = NOISY.replace(kernel=kernel)
    cases = [
        (AF.conv2d, F.conv2d, (0, 3, 8, 8), (4, 3, 3, 3), dict(padding=1)),
        (AF.conv2d, F.conv2d, (0, 4, 7, 7), (4, 2, 3, 3), dict(stride=2, groups=2)),
        (AF.conv1d, F.conv1d, (0, 3, 9), (5, 3, 3), {}),
        (AF.linear, F.linear, (0, 6), (4, 6), {}),
        (AF.linear, F.linear, (2, 0, 6), (4, 6), {}),
    ]
    for fn, ref, xs, ws, kw in cases:
        x = torch.randn(*xs, requires_grad=grad)
        w, b = torch.randn(*ws), torch.randn(ws[0])
        y = fn(x, w, b, **kw, config=cfg)
        assert y.shape == ref(x, w, b, **kw).shape and y.dtype == x.dtype
        if grad:
            y.sum().backward()
            assert x.grad.shape == x.shape
    for sa, sb in [((0, 6), (6, 4)), ((3, 0, 6), (6, 4)), ((0, 2, 6), (6, 4)), ((2, 3, 6), (2, 6, 0))]:
        a = torch.randn(*sa, requires_grad=grad)
        y = AF.matmul(a, torch.randn(*sb), config=cfg)
        assert y.shape == torch.Size(sa[:-1] + sb[-1:])
        if grad:
            y.sum().backward()


# ----------------------------------------------------------------------------- bf16_io bias
def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float64)


def _assert_bf16_output(y: torch.Tensor, expect64: torch.Tensor) -> None:
    """``y`` is a layer output kept in bfloat16 and equals the float64 evaluation rounded to
    bfloat16 (at most one bfloat16 step apart where float32 rounding lands on a tie)."""
    y = y.detach().double()
    assert torch.equal(y, _bf16(y)), "the output after the bias is not rounded to bfloat16"
    want = _bf16(expect64)
    ulp = want.abs().clamp_min(1e-30) * 2.0**-7
    assert bool(((y - want).abs() <= ulp).all())
    assert float((y == want).double().mean()) > 0.99


@pytest.mark.parametrize("kernel", ["auto", "reference"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_io_rounds_the_output_after_the_digital_bias(kernel, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = ABFPConfig(noise_std=0.0, tile_width=16, gain=1.0, bf16_io=True, kernel=kernel)
    oracle = cfg.replace(bf16_io=False, kernel="reference")
    # linear: SPEC 1 steps 1-7 in float64 on bfloat16 inputs and weights, then the bias
    x, w, b = torch.randn(7, 50, generator=g), torch.randn(9, 50, generator=g), torch.randn(9, generator=g) * 3
    y64 = reference_product(_bf16(x), _bf16(w), oracle).y[0] + b.double()
    _assert_bf16_output(AF.linear(x, w, b, config=cfg), y64)
    # conv2d as im2col (unfold order)
    xc, wc, bc = torch.randn(2, 3, 6, 6, generator=g), torch.randn(5, 3, 3, 3, generator=g), torch.randn(5, generator=g)
    cols = F.unfold(_bf16(xc), 3, padding=1).transpose(1, 2).reshape(-1, 27)  # (B*L, K)
    yc = reference_product(cols, _bf16(wc).reshape(5, 27), oracle).y[0] + bc.double()
    yc = yc.reshape(2, 36, 5).permute(0, 2, 1).reshape(2, 5, 6, 6)
    _assert_bf16_output(AF.conv2d(xc, wc, bc, padding=1, config=cfg), yc)
    # conv1d
    x1, w1, b1 = torch.randn(2, 4, 10, generator=g), torch.randn(3, 4, 3, generator=g), torch.randn(3, generator=g)
    cols1 = F.unfold(_bf16(x1).unsqueeze(2), (1, 3)).transpose(1, 2).reshape(-1, 12)
    y1 = (reference_product(cols1, _bf16(w1).reshape(3, 12), oracle).y[0] + b1.double()).reshape(2, 8, 3).transpose(1, 2)
    _assert_bf16_output(AF.conv1d(x1, w1, b1, config=cfg), y1)


def test_bf16_io_without_bias_is_unchanged_by_the_bias_rule():
    cfg = ABFPConfig(noise_std=0.0, tile_width=16, gain=1.0, bf16_io=True)
    x, w = torch.randn(7, 50), torch.randn(9, 50)
    y64 = reference_product(_bf16(x), _bf16(w), cfg.replace(bf16_io=False, kernel="reference")).y[0]
    _assert_bf16_output(AF.linear(x, w, config=cfg), y64)


# ----------------------------------------------------------------------------- fixed point
def test_fixed_point_functional_call_has_one_scale_for_the_whole_call(monkeypatch):
    """Without ``input_scale`` a call's static scale is max |x| of the whole tensor, also when
    the call is computed in chunks of images whose own maxima differ."""
    monkeypatch.setattr(AF, "_IM2COL_ELEMENTS", 8 * 8 * 3 * 9)  # one image per chunk
    cfg = ABFPConfig(mode="fixed", noise_std=0.0, tile_width=8, gain=1.0, kernel="reference")
    x = torch.randn(3, 3, 8, 8) * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1, 1)
    w = torch.randn(4, 3, 3, 3)
    cols = F.unfold(x.double(), 3, padding=1).transpose(1, 2).reshape(-1, 27)
    y64 = reference_product(cols, w.double().reshape(4, 27), cfg, input_scale=float(x.abs().max())).y[0]
    y64 = y64.reshape(3, 64, 4).permute(0, 2, 1).reshape(3, 4, 8, 8)
    torch.testing.assert_close(AF.conv2d(x, w, padding=1, config=cfg).double(), y64, rtol=1e-6, atol=1e-6)
