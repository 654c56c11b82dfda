"""abfp.functional: shapes, dtypes, bad input, limits, noise, gradients, convolutions, attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import abfp.functional as AF
from abfp import ABFPConfig
from abfp.metrics import relative_error
from abfp.numerics import ProductStats, reference_product

QUIET = ABFPConfig(noise_std=0.0)
IDEAL = ABFPConfig(input_bits=16, weight_bits=16, output_bits=24, gain=1.0, noise_std=0.0, scale_dtype="float32")


def test_linear_matches_reference_with_bias_and_leading_dims():
    x = torch.randn(2, 3, 5, 70)
    w = torch.randn(11, 70)
    b = torch.randn(11)
    y = AF.linear(x, w, b, config=QUIET)
    ref = reference_product(x.reshape(-1, 70), w, QUIET).y[0].reshape(2, 3, 5, 11) + b.double()
    assert y.shape == (2, 3, 5, 11)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_many_bits_gain_one_no_noise_tends_to_float32():
    x = torch.randn(64, 300)
    w = torch.randn(40, 300)
    assert relative_error(AF.linear(x, w, config=IDEAL), x @ w.T) < 1e-4
    errs = [relative_error(AF.linear(x, w, config=IDEAL.replace(input_bits=b, weight_bits=b, output_bits=b)), x @ w.T)
            for b in (6, 8, 10, 12)]
    assert errs == sorted(errs, reverse=True), errs


def test_saturated_fraction_grows_with_gain():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 512, generator=g)
    w = torch.randn(256, 512, generator=g)
    fractions = []
    for gain in (1, 2, 4, 8, 16, 32, 64):
        stats = ProductStats()
        AF.linear(x, w, config=QUIET.replace(gain=float(gain)), stats=stats)
        fractions.append(stats.saturated / stats.conversions)
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] > 0.1


def test_zero_blocks_give_exact_zeros_and_empty_inputs_give_empty_outputs():
    x = torch.zeros(4, 256)
    x[:, 128:] = torch.randn(4, 128)
    w = torch.zeros(5, 256)
    w[:, :128] = torch.randn(5, 128)  # every tile has one all-zero operand
    assert torch.equal(AF.linear(x, w, config=QUIET), torch.zeros(4, 5))
    assert AF.linear(torch.zeros(0, 8), torch.randn(3, 8), config=QUIET).shape == (0, 3)
    assert AF.linear(torch.zeros(2, 0), torch.zeros(3, 0), config=QUIET).abs().sum() == 0
    assert AF.matmul(torch.zeros(0, 2, 3), torch.randn(3, 4), config=QUIET).shape == (0, 2, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_in_dtype_out(dtype):
    x = torch.randn(3, 40).to(dtype)
    w = torch.randn(6, 40).to(dtype)
    assert AF.linear(x, w, config=QUIET).dtype == dtype
    assert AF.matmul(x, w.T, config=QUIET).dtype == dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused_by_name(bad):
    x = torch.randn(3, 8)
    w = torch.randn(2, 8)
    xb = x.clone()
    xb[1, 2] = bad
    with pytest.raises(ValueError, match="input"):
        AF.linear(xb, w, config=QUIET)
    wb = w.clone()
    wb[0, 0] = bad
    with pytest.raises(ValueError, match="weight"):
        AF.linear(x, wb, config=QUIET)
    with pytest.raises(ValueError, match="second operand"):
        AF.matmul(x, wb.T, config=QUIET)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="in_features"):
        AF.linear(torch.randn(3, 8), torch.randn(2, 9), config=QUIET)
    with pytest.raises(ValueError, match="do not match"):
        AF.matmul(torch.randn(3, 8), torch.randn(9, 2), config=QUIET)
    with pytest.raises(TypeError, match="floating"):
        AF.linear(torch.ones(3, 8, dtype=torch.int64), torch.randn(2, 8), config=QUIET)


@settings(max_examples=30, deadline=None)
@given(
    a_batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    b_batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    m=st.integers(1, 6), k=st.integers(1, 40), n=st.integers(1, 6),
)
def test_matmul_broadcasts_like_torch_and_matches_the_reference(a_batch, b_batch, m, k, n):
    # make batch shapes broadcast-compatible
    lb = max(len(a_batch), len(b_batch))
    ab = [1] * (lb - len(a_batch)) + a_batch
    bb = [1] * (lb - len(b_batch)) + b_batch
    bb = [x if (x == y or 1 in (x, y)) else 1 for x, y in zip(bb, ab)]
    a = torch.randn(*a_batch, m, k)
    b = torch.randn(*bb[lb - len(b_batch):] if b_batch else [], k, n)
    cfg = QUIET.replace(tile_width=8, gain=1.0)
    y = AF.matmul(a, b, config=cfg)
    expect_shape = torch.matmul(a, b).shape
    assert y.shape == expect_shape
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, m, k).reshape(-1, m, k)
    b3 = b.expand(*batch, k, n).transpose(-1, -2).reshape(-1, n, k)
    ref = reference_product(a3, b3, cfg).y.reshape(expect_shape)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_matmul_vector_operands():
    a = torch.randn(30)
    b = torch.randn(30, 4)
    assert AF.matmul(a, b, config=IDEAL).shape == (4,)
    assert AF.matmul(b.T, a, config=IDEAL).shape == (4,)
    torch.testing.assert_close(AF.matmul(a, b, config=IDEAL), a @ b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("eq,sa,sb", [
    ("bhqd,bhkd->bhqk", (2, 3, 5, 16), (2, 3, 7, 16)),
    ("bhqk,bhkd->bhqd", (2, 3, 5, 7), (2, 3, 7, 16)),
    ("ij,jk", (4, 9), (9, 3)),
    ("...ij,...jk->...ik", (2, 4, 9), (2, 9, 3)),
    ("bij,jk->bik", (2, 4, 9), (9, 3)),
])
def test_einsum_contractions(eq, sa, sb):
    a, b = torch.randn(sa), torch.randn(sb)
    y = AF.einsum(eq, a, b, config=IDEAL)
    torch.testing.assert_close(y, torch.einsum(eq, a, b), rtol=1e-3, atol=1e-3)
    # and on a coarse device it is the analog result, not the digital one
    assert not torch.allclose(AF.einsum(eq, a, b, config=QUIET.replace(input_bits=3, weight_bits=3)), torch.einsum(eq, a, b))


@pytest.mark.parametrize("kw", [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=1, padding=2, dilation=2, groups=1),
    dict(stride=1, padding=1, dilation=1, groups=2),
    dict(stride=1, padding="same", dilation=1, groups=1),
    dict(stride=1, padding=1, dilation=1, groups=8),  # depthwise
])
def test_conv2d_layouts_agree_with_torch_on_an_ideal_device(kw):
    x = torch.randn(2, 8, 9, 10)
    w = torch.randn(8 if kw["groups"] == 8 else 6, 8 // kw["groups"], 3, 3)
    b = torch.randn(w.shape[0])
    y = AF.conv2d(x, w, b, **kw, config=IDEAL)
    ref = F.conv2d(x, w, b, **kw)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-3)


def test_conv2d_is_linear_on_im2col_patches():
    """The reduction axis is C_in*k_h*k_w in unfold order: compare with the reference on patches."""
    x = torch.randn(1, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)
    cfg = QUIET.replace(tile_width=8)
    y = AF.conv2d(x, w, config=cfg)
    cols = F.unfold(x, 3).transpose(1, 2)[0]  # (L, 27)
    ref = reference_product(cols, w.reshape(4, 27), cfg).y[0]  # (L, 4)
    torch.testing.assert_close(y[0].reshape(4, -1).T.double(), ref, rtol=1e-5, atol=1e-5)


def test_conv1d_matches_torch_on_an_ideal_device():
    x = torch.randn(2, 4, 20)
    w = torch.randn(6, 2, 5)
    y = AF.conv1d(x, w, None, 2, 1, 1, 2, config=IDEAL)
    torch.testing.assert_close(y, F.conv1d(x, w, None, 2, 1, 1, 2), rtol=1e-3, atol=1e-3)


def test_noise_is_reproducible_from_seed_or_generator_and_has_the_configured_size():
    x = torch.randn(64, 256)
    w = torch.randn(64, 256)
    cfg = ABFPConfig(seed=3, gain=8.0)
    AF.reseed()
    a = AF.linear(x, w, config=cfg)
    AF.reseed()  # the same sequence of calls after a restart: the same numbers
    assert torch.equal(a, AF.linear(x, w, config=cfg))
    assert not torch.equal(a, AF.linear(x, w, config=cfg.replace(seed=4)))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(AF.linear(x, w, config=cfg, generator=g1), AF.linear(x, w, config=cfg, generator=g2))
    # noise_std=1 LSB moves outputs by about one ADC code per tile, unbiased
    quiet = AF.linear(x, w, config=cfg.replace(noise_std=0.0))
    loud = torch.stack([AF.linear(x, w, config=cfg.replace(noise_std=1.0, seed=s)) for s in range(8)])
    code = 128 / (8.0 * 127)  # times sx*sw: compare in units of tile codes via the reference
    ref = reference_product(x, w, cfg.replace(noise_std=0.0))
    unit = (ref.sx.unsqueeze(2) * ref.sw.unsqueeze(1) * code)[0]  # (M, N, T)
    per_output_code = unit.pow(2).sum(-1).sqrt()  # std of the sum of T independent one-code errors
    z = (loud - quiet) / per_output_code
    assert abs(float(z.mean())) < 0.05
    assert 0.85 < float(z.std()) < 1.15  # rounding of noisy values keeps the variance near 1 LSB^2


def test_straight_through_gradients_without_saturation():
    x = torch.randn(5, 40, requires_grad=True)
    w = torch.randn(7, 40, requires_grad=True)
    cfg = QUIET.replace(tile_width=16, gain=1.0)
    y = AF.linear(x, w, config=cfg)
    gy = torch.randn_like(y)
    y.backward(gy)
    # STE: d y/d x = dequantised weights, d y/d w = dequantised inputs
    ref_x = reference_product(x.detach(), w.detach(), cfg)
    wq = _dequantise(w.detach(), cfg.tile_width, cfg.weight_max_code)
    xq = _dequantise(x.detach(), cfg.tile_width, cfg.input_max_code)
    assert not bool(ref_x.saturated.any())
    torch.testing.assert_close(x.grad, gy @ wq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, gy.T @ xq, rtol=1e-4, atol=1e-5)


def test_straight_through_gradients_are_zero_where_the_adc_clips():
    torch.manual_seed(0)
    x = torch.randn(6, 64, requires_grad=True)
    w = torch.randn(5, 64, requires_grad=True)
    cfg = QUIET.replace(tile_width=16, gain=32.0)
    y = AF.linear(x, w, config=cfg)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref = reference_product(x.detach(), w.detach(), cfg)
    assert ref.saturated.any()
    keep = (~ref.saturated[0]).double()  # (M, N, T)
    xq = _dequantise(x.detach(), 16, cfg.input_max_code).double().reshape(6, 4, 16)
    wq = _dequantise(w.detach(), 16, cfg.weight_max_code).double().reshape(5, 4, 16)
    gx = torch.einsum("mn,mnt,ntk->mtk", gy.double(), keep, wq).reshape(6, 64)
    gw = torch.einsum("mn,mnt,mtk->ntk", gy.double(), keep, xq).reshape(5, 64)
    torch.testing.assert_close(x.grad.double(), gx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-4, atol=1e-5)


def test_gradient_is_zero_outside_a_fixed_point_clamp():
    x = torch.tensor([[0.5, 3.0, -0.25, -4.0]], requires_grad=True)
    w = torch.ones(1, 4)
    cfg = QUIET.replace(mode="fixed", tile_width=4, gain=1.0)
    AF.linear(x, w, config=cfg, input_scale=1.0).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def _dequantise(v: torch.Tensor, n: int, L: int) -> torch.Tensor:
    """Independent float64 fake-quantisation (bf16 block scales), for the gradient checks."""
    k = v.shape[-1]
    t = math.ceil(k / n)
    vp = F.pad(v.double(), (0, t * n - k)).reshape(*v.shape[:-1], t, n)
    s = vp.abs().amax(-1, keepdim=True).float().bfloat16().double()
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(torch.clamp(vp / s, -1, 1) * L) * s / L
    return q.reshape(*v.shape[:-1], t * n)[..., :k].float()


def test_weight_cache_reencodes_after_an_optimizer_step():
    lin = torch.nn.Linear(32, 8)
    x = torch.randn(4, 32)
    cfg = QUIET
    y0 = AF.linear(x, lin.weight, lin.bias, config=cfg)
    hits = AF.WEIGHT_CACHE.hits
    assert torch.equal(AF.linear(x, lin.weight, lin.bias, config=cfg), y0)
    assert AF.WEIGHT_CACHE.hits == hits + 1
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    AF.linear(x, lin.weight, lin.bias, config=cfg).sum().backward()
    opt.step()
    y1 = AF.linear(x, lin.weight, lin.bias, config=cfg)
    fresh = AF.linear(x, lin.weight, lin.bias, config=cfg, cache=False)
    assert torch.equal(y1, fresh) and not torch.equal(y1, y0)


def test_fixed_mode_uses_the_static_scales():
    x = torch.randn(8, 64)
    w = torch.randn(4, 64)
    cfg = QUIET.replace(mode="fixed", gain=1.0)
    y = AF.linear(x, w, config=cfg, input_scale=2.0, weight_scale=1.5)
    ref = reference_product(x, w, cfg, input_scale=2.0, weight_scale=1.5)
    torch.testing.assert_close(y.double(), ref.y[0], rtol=1e-5, atol=1e-6)
    assert float(ref.sx.unique()) == 2.0
    with pytest.raises(ValueError, match="scale"):
        AF.linear(x, w, config=cfg, input_scale=float("nan"))
