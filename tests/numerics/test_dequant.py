"""The compiled dequantisation of the QAT backward (``numerics.dequant``: rows, and a convolution's
patches straight from its input) equals the torch path
of ``ops.device.dequantised_rows`` bit for bit, and both equal an independent float64
evaluation of the formula (``q = round(clamp(v / s, -1, 1) L) s / L``, 0 for a zero block)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abfp import ABFPConfig
from abfp.numerics import dequant, fused
from abfp.ops import device

pytestmark = pytest.mark.skipif(not fused.usable(), reason="numba is not usable here")


def _float64_dequant(v: torch.Tensor, n: int, scale_dtype: str, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula in float64 from float32 operands, one tile at a time (the scales as the
    scale format gives them: bfloat16 by round to nearest even, pow2 = 2**ceil(log2 max))."""
    out = torch.zeros(v.shape, dtype=torch.float64)
    step = torch.zeros(v.shape, dtype=torch.float64)
    for t in range(0, v.shape[1], n):
        blk = v[:, t : t + n].double()
        m = blk.abs().amax(1, keepdim=True)
        if scale_dtype == "bfloat16":
            s = m.float().to(torch.bfloat16).double()
        elif scale_dtype == "pow2":
            s = torch.where(m > 0, 2.0 ** torch.ceil(torch.log2(m.clamp_min(1e-300))), torch.zeros_like(m))
        else:
            s = m
        r = torch.where(s > 0, blk / torch.where(s > 0, s, 1.0), 0.0).clamp(-1, 1)
        out[:, t : t + n] = torch.round(r * L) * s / L
        step[:, t : t + n] = s / L
    return out, step


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(R=st.integers(1, 40), K=st.integers(1, 300), n=st.sampled_from([1, 3, 8, 32, 128]),
       scale_dtype=st.sampled_from(["bfloat16", "float32", "pow2"]), bits=st.integers(2, 10),
       seed=st.integers(0, 2**31 - 1))
def test_compiled_dequantisation_equals_the_torch_path(monkeypatch, R, K, n, scale_dtype, bits, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, R, K, generator=g) * torch.logspace(-3, 3, R).view(1, R, 1)
    v[0, 0, : min(K, n)] = 0.0  # a zero block
    v[0, -1, :: 5] = -0.0
    cfg = ABFPConfig(tile_width=n, scale_dtype=scale_dtype, input_bits=bits)
    fast, mask = device.dequantised_rows(v, cfg, None, cfg.input_max_code)
    assert mask is None
    monkeypatch.setattr(dequant, "usable", lambda t: False)
    slow, _ = device.dequantised_rows(v, cfg, None, cfg.input_max_code)
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))
    expect, step = _float64_dequant(v[0], n, scale_dtype, cfg.input_max_code)
    err = (fast[0].double() - expect).abs()
    # float32 against float64: the same code, but for a quotient within an ulp of a half-integer
    assert bool((err <= 1e-6 * expect.abs() + 1.0001 * step).all())
    assert int((err > 1e-6 * expect.abs()).sum()) <= max(1, err.numel() // 1000)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), groups=st.sampled_from([1, 2]), cg=st.integers(1, 5), hw=st.integers(3, 9),
       k=st.sampled_from([(1, 1), (2, 3), (3, 3)]), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       n=st.sampled_from([1, 4, 16, 128]), scale_dtype=st.sampled_from(["bfloat16", "float32"]),
       seed=st.integers(0, 2**31 - 1))
def test_patches_dequantised_from_the_input_equal_the_im2col_rows(b, groups, cg, hw, k, stride, dilation, n,
                                                                  scale_dtype, seed):
    from abfp.ops.conv import _im2col

    ho = (hw - dilation * (k[0] - 1) - 1) // stride + 1
    wo = (hw - dilation * (k[1] - 1) - 1) // stride + 1
    if ho <= 0 or wo <= 0:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, groups * cg, hw, hw, generator=g)
    x[0, 0] = 0.0
    kg = cg * k[0] * k[1]
    cols = _im2col(x, k[0], k[1], (stride, stride), (dilation, dilation), ho, wo).reshape(b * ho * wo, groups, kg)
    cfg = ABFPConfig(tile_width=n, scale_dtype=scale_dtype)
    expect, _ = device.dequantised_rows(cols.permute(1, 0, 2), cfg, None, cfg.input_max_code)
    got = dequant.dequantise_patches(x, groups, k, (stride, stride), (dilation, dilation), (ho, wo), n, scale_dtype,
                                     cfg.input_max_code, torch.empty(groups, b * ho * wo, kg))
    assert torch.equal(got.view(torch.int32), expect.view(torch.int32))
