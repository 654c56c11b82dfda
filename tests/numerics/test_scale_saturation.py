"""Block maxima beyond the largest value of the scale format (found on Hugging Face Longformer,
whose attention mask is an einsum of ones with ``torch.finfo(float32).min``).

bfloat16 rounds a float32 above ``(2 - 2^-8) 2^127`` to ``inf``, and ``pow2`` made every scale
above ``2^127`` into ``2^128 = inf``: the block encoded as zeros and the rescale multiplied them
by ``inf``: NaN out of finite operands. A scale format saturates at its largest finite value
(bfloat16 ``(2 - 2^-7) 2^127``, pow2 ``2^127``) and the DAC clamp saturates the codes, so the
product is finite wherever its float64 value fits in float32 (and ``+-inf`` only beyond it,
as any float32 arithmetic gives), never NaN."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from abfp import ABFPConfig
from abfp import functional as AF
from abfp.numerics import fused, reference_product
from abfp.numerics.blocks import round_scale

sys.path.insert(0, str(Path(__file__).parent))
from spec64 import spec64 as _spec64  # noqa: E402

F32_MAX = float(torch.finfo(torch.float32).max)
BF16_MAX = float(torch.finfo(torch.bfloat16).max)


def test_scale_formats_saturate_at_their_largest_finite_value():
    s = torch.tensor([F32_MAX, 3.397e38, 2.0**127 * 1.5, 3.0e38, 1.0])
    below = float(torch.tensor(3.0e38).to(torch.bfloat16))  # finite in bfloat16: rounded as before
    assert round_scale(s, "bfloat16").tolist() == [BF16_MAX, BF16_MAX, 2.0**127 * 1.5, below, 1.0]
    assert round_scale(s, "pow2").tolist() == [2.0**127] * 4 + [1.0]
    for fmt in ("bfloat16", "pow2"):
        ref = reference_product(s.view(1, 5, 1), torch.ones(1, 1, 1), ABFPConfig(tile_width=1, scale_dtype=fmt))
        torch.testing.assert_close(ref.sx.view(5).float(), round_scale(s, fmt), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["bfloat16", "pow2"])
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("kernel", ["auto", "chunked", "reference"])
def test_products_of_blocks_beyond_the_largest_scale(monkeypatch, fmt, compiled, kernel):
    """Weights whose block maxima reach float32's max give the numbers of an independent float64
    evaluation of SPEC (scales saturating). Input rows and convolution patches with one such
    block per output are never NaN: finite outputs agree with it, and an output whose tile
    rescale ``(qy sx) (sw n / (G L(b_y)))`` passes float32's max is ``inf`` of the right sign
    (the fast path's float32 order; the reference evaluates it in float64)."""
    if compiled and not fused.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(fused, "AVAILABLE", compiled)
    AF.clear_cache()
    g = torch.Generator().manual_seed(2)
    cfg = ABFPConfig(noise_std=0.0, tile_width=8, scale_dtype=fmt, kernel=kernel)
    big = torch.randn(6, 20, generator=g)
    big[:, 3] = -F32_MAX  # every row's first block saturates its scale
    big[::2, 17] = F32_MAX * 0.9999
    small = torch.randn(5, 20, generator=g) / 40  # |y| stays well inside float32
    with torch.no_grad():
        yw = AF.linear(small, big, config=cfg, cache=False)  # the huge values as weights
    want = _spec64(small, big, cfg)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(yw.double(), want, rtol=1e-5, atol=0)

    def check(out, want):
        assert not torch.isnan(out).any()
        fin = torch.isfinite(out)
        torch.testing.assert_close(out[fin].double(), want[fin], rtol=1e-5, atol=1e-6)  # float32 tile sums
        assert torch.equal(out[~fin].sign().double(), want[~fin].sign())

    x = big.clone()
    x[::2, 17] = 0.5  # one saturated block per row
    with torch.no_grad():
        check(AF.linear(x, small, config=cfg, cache=False), _spec64(x, small, cfg))
    xi = torch.randn(2, 3, 5, 5, generator=g)
    xi[0, 1, 2, 2] = -F32_MAX
    xi[1, 0, 4, 1] = F32_MAX
    wc = torch.randn(4, 3, 3, 3, generator=g) / 40
    with torch.no_grad():
        yc = AF.conv2d(xi, wc, padding=1, config=cfg, cache=False)
    cols = torch.nn.functional.unfold(xi, 3, padding=1).transpose(1, 2).reshape(-1, 27)  # (B P, K)
    check(yc, _spec64(cols, wc.reshape(4, -1), cfg).reshape(2, 25, 4).transpose(1, 2).reshape(2, 4, 5, 5))


@pytest.mark.parametrize("fmt", ["bfloat16", "pow2"])
def test_a_mask_of_float32_min_through_a_product_is_never_nan(fmt):
    """Longformer's diagonal mask, ``einsum(ones, finfo.min mask)``: the masked entries come out
    at or beyond float32's min (``-inf`` where the ADC's rounding pushes past it), never NaN."""
    ones = torch.ones(2, 4, 1)
    mask = torch.zeros(2, 1, 4)
    mask[..., 2:] = torch.finfo(torch.float32).min
    y = AF.matmul(ones, mask, config=ABFPConfig(noise_std=0.0, scale_dtype=fmt))
    assert not torch.isnan(y).any()
    assert (y[..., :2] == 0).all() and (y[..., 2:] < -2.0**127).all()


@pytest.mark.parametrize("n", [8, 128])
def test_fast_path_input_blocks_at_float32_max(n):
    """(A strict xfail until session 17: the fast path's ``qy * sx`` overflowed; the input is now
    scaled by a power of two first, ``ops/device.overflow_shift``.)"""
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    x[:, 3] = -F32_MAX
    w = torch.randn(4, 20, generator=torch.Generator().manual_seed(1)) / 40
    cfg = ABFPConfig(noise_std=0.0, tile_width=n)
    ref = reference_product(x.unsqueeze(0), w.unsqueeze(0), cfg).y[0]
    assert torch.isfinite(ref.float()).all()
    torch.testing.assert_close(AF.linear(x, w, config=cfg, cache=False).double(), ref, rtol=1e-5, atol=0)
