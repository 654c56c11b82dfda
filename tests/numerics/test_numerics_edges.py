"""Edge cases of the fast path's numerics: subnormal block maxima, pow2 scales at powers of
two, exact GEMMs on codes on CUDA whatever its TF32 settings (checked on CPU by rounding the
codes as a reduced-precision GEMM would)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from abfp import ABFPConfig
from abfp import functional as AF
from abfp.numerics import analog_product, encode_weights, fused, reference_product
from abfp.numerics.adc import AdcPlan, code_gemm_dtype
from abfp.numerics.blocks import encode_rows, round_scale


def _subnormal_blocks(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Values whose blocks' maxima are float32 subnormals that bfloat16 rounds far down
    (e.g. 1.4 * 2^-133 -> 2^-133)."""
    return (torch.rand(shape, generator=g) * 2.8 - 1.4) * 2.0**-133


def _expected_codes(v: torch.Tensor, n: int, max_code: int) -> torch.Tensor:
    """SPEC step 3 in float64 with bfloat16 scales: (..., T, n)."""
    k = v.shape[-1]
    t = -(-k // n)
    vt = torch.nn.functional.pad(v.double(), (0, t * n - k)).reshape(*v.shape[:-1], t, n)
    s = vt.abs().amax(-1, keepdim=True).float().to(torch.bfloat16).double()
    q = torch.round(torch.clamp(vt / torch.where(s > 0, s, torch.ones_like(s)), -1, 1) * max_code)
    return torch.where(s > 0, q, torch.zeros_like(q))


@pytest.mark.parametrize("bits", [4, 8])
def test_subnormal_block_maxima_give_codes_within_the_dac_range(bits):
    """bfloat16 rounding of a subnormal block max can halve it: the codes must still be
    clamped to L(b) (and the int8 weight codes must not wrap)."""
    g = torch.Generator().manual_seed(0)
    cfg = ABFPConfig(noise_std=0.0, tile_width=16, input_bits=bits, weight_bits=bits)
    w = _subnormal_blocks((1, 24, 64), g)
    enc = encode_weights(w, cfg)
    plan = AdcPlan.for_config(cfg)
    codes = (enc.codes / plan.code_multiplier).permute(0, 3, 1, 2)  # (B, N, T, n)
    assert torch.equal(codes.double(), _expected_codes(w, 16, cfg.weight_max_code))
    if enc.codes_i8 is not None:
        assert torch.equal(enc.codes_i8.permute(0, 3, 1, 2).double(), codes.double())
    x = _subnormal_blocks((2, 5, 64), g)
    qx, _ = encode_rows(x, n=16, max_code=cfg.input_max_code, mode="abfp", scale_dtype="bfloat16")
    assert torch.equal(qx.double(), _expected_codes(x, 16, cfg.input_max_code))


@pytest.mark.parametrize("compiled", [True, False])
def test_subnormal_inputs_of_linear_and_convolution_layers_match_the_reference(monkeypatch, compiled):
    """The rows and the convolution encoders (compiled and torch) clamp subnormal blocks too."""
    if compiled and not fused.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(fused, "AVAILABLE", compiled)
    AF.clear_cache()
    g = torch.Generator().manual_seed(1)
    cfg = ABFPConfig(noise_std=0.0, tile_width=32, gain=1.0)
    x = _subnormal_blocks((4, 96), g)
    w = torch.randn(8, 96, generator=g)
    with torch.no_grad():
        y = AF.linear(x, w, config=cfg, cache=False)
    ref = reference_product(x, w, cfg).y[0]
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2.0**-140)
    xi = _subnormal_blocks((2, 4, 6, 6), g)
    wc = torch.randn(5, 4, 3, 3, generator=g)
    with torch.no_grad():
        yc = AF.conv2d(xi, wc, padding=1, config=cfg, cache=False)
    cols = torch.nn.functional.unfold(xi, 3, padding=1).transpose(1, 2)  # (B, P, K)
    refc = reference_product(cols, wc.reshape(5, -1).unsqueeze(0), cfg).y  # (B, P, N)
    torch.testing.assert_close(yc.flatten(2).transpose(1, 2).double(), refc, rtol=1e-5, atol=2.0**-140)


def _pow2_exact(v: float) -> float:
    m, e = math.frexp(v)
    return math.ldexp(1.0, e - 1 if m == 0.5 else e)


@seed(5)
@settings(max_examples=300, deadline=None)
@given(bits=st.integers(1, 0x7F000000), ulps=st.integers(-3, 3))
def test_pow2_scales_round_up_exactly(bits, ulps):
    """``2**ceil(log2 s)`` of every float32 (normal or subnormal), and of its neighbours just
    above and below powers of two, in the fast path and the reference alike."""
    v = torch.tensor([bits], dtype=torch.int32).view(torch.float32)
    near = torch.tensor([2.0 ** ((bits % 250) - 125)], dtype=torch.float32) * (1 + ulps * 2.0**-23)
    for s in (v, near):
        want = _pow2_exact(float(s))
        assert float(round_scale(s, "pow2")) == want
        ref = reference_product(s.view(1, 1), torch.ones(1, 1), ABFPConfig(tile_width=1, scale_dtype="pow2"))
        assert float(ref.sx) == want


def test_pow2_scale_just_above_a_power_of_two():
    """1024 (1 + 2^-23): float32 log2 rounds to 10, so the scale came out 2^10 (< the max) on
    the fast path and 2^11 in the reference."""
    s = torch.tensor([1024 * (1 + 2.0**-23)])
    assert float(round_scale(s, "pow2")) == 2048.0
    cfg = ABFPConfig(noise_std=0.0, tile_width=2, gain=1.0, scale_dtype="pow2", input_bits=12, output_bits=16)
    x = torch.tensor([[[1024 * (1 + 2.0**-23), 700.0]]])
    w = torch.ones(1, 3, 2)
    y, _ = _product(x, w, cfg)
    torch.testing.assert_close(y.double(), reference_product(x, w, cfg).y, rtol=1e-6, atol=0)  # float32 sum


def _product(x, w, cfg, seed: int | None = None):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return analog_product(x, w, cfg, generator=gen)


def _bf16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.to(torch.bfloat16).to(t.dtype), t))


@seed(3)
@settings(max_examples=60, deadline=None)
@given(wb=st.integers(2, 12), xb=st.integers(2, 12), n=st.sampled_from([8, 32, 100, 128]),
       gain=st.sampled_from([1.0, 2.0, 3.0, 8.0, 16.0]), ob=st.integers(4, 12))
def test_cuda_code_gemms_are_exact_under_reduced_precision(wb, xb, n, gain, ob):
    """Where :func:`code_gemm_dtype` keeps a float32 GEMM on CUDA, every code it multiplies
    is exact in bfloat16 (so TF32 or bfloat16 inputs change nothing, the products being summed
    in float32); elsewhere it multiplies in float64. CPU keeps the plan's dtype."""
    cfg = ABFPConfig(noise_std=0.0, tile_width=n, weight_bits=wb, input_bits=xb, output_bits=ob, gain=gain)
    plan = AdcPlan.for_config(cfg)
    cuda = code_gemm_dtype(plan, torch.device("cuda"), cfg.weight_max_code, cfg.input_max_code)
    assert code_gemm_dtype(plan, torch.device("cpu"), cfg.weight_max_code, cfg.input_max_code) == plan.gemm_dtype
    if plan.gemm_dtype == torch.float64:
        assert cuda == torch.float64
        return
    g = torch.Generator().manual_seed(wb * 1000 + xb)
    w = torch.randn(1, 16, 2 * n, generator=g)
    x = torch.randn(1, 16, 2 * n, generator=g)
    wc = encode_weights(w, cfg).codes  # times the code multiplier, as the GEMM takes them
    xc, _ = encode_rows(x, n=n, max_code=cfg.input_max_code, mode="abfp", scale_dtype="bfloat16")
    exact = _bf16_exact(wc) and _bf16_exact(xc)
    # float32 on CUDA only where exact; the largest codes (L(b) is reached) decide
    assert cuda == (torch.float32 if exact else torch.float64)


def test_default_device_keeps_float32_on_cuda_and_6_6_8_takes_float64():
    c888, c668 = ABFPConfig(), ABFPConfig(input_bits=6, weight_bits=6, tile_width=32, gain=2.0)
    cuda = torch.device("cuda")
    assert code_gemm_dtype(AdcPlan.for_config(c888), cuda, 127, 127) == torch.float32
    assert code_gemm_dtype(AdcPlan.for_config(c668), cuda, 31, 31) == torch.float64


def test_a_float64_code_gemm_gives_the_same_numbers(monkeypatch):
    """The routing CUDA takes (codes multiplied in float64, products stored back exactly)
    gives the float32 path's numbers bit for bit, noise included, rows and columns."""
    import abfp.numerics.kernels as kernels

    cfg = ABFPConfig(input_bits=6, weight_bits=6, tile_width=32, gain=2.0, kernel="chunked")
    x = torch.randn(2, 20, 100)
    w = torch.randn(1, 12, 100)
    xi, wc = torch.randn(2, 3, 7, 7), torch.randn(4, 3, 3, 3)
    monkeypatch.setattr(fused, "AVAILABLE", False)

    def run():
        AF.clear_cache()
        y, _ = _product(x, w, cfg, seed=1)
        with torch.no_grad():
            yc = AF.conv2d(xi, wc, padding=1, config=cfg, generator=torch.Generator().manual_seed(2), cache=False)
        return y, yc

    base = run()
    seen = []

    def f64(plan, device, lw, lx):
        seen.append(1)
        return torch.float64

    monkeypatch.setattr(kernels, "code_gemm_dtype", f64)
    routed = run()
    assert seen and torch.equal(base[0], routed[0]) and torch.equal(base[1], routed[1])
