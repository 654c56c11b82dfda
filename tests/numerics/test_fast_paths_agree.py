"""The fast paths agree with each other and with the float64 reference.

- int8 GEMMs (``torch._int_mm``, exact int32 sums) give the same results as float32 GEMMs
  on the same codes, bit for bit, noise, saturation statistics and ties included;
- the inference convolution (column layout, :func:`abfp.numerics.kernels.analog_gemm_cols`)
  gives the same tile outputs as the row-major im2col path that carries gradients (itself
  tested against the reference), on random geometries: equal up to the order of the float32
  sum over tiles;
- chunking (several images, or a few output rows of one image) does not change results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import abfp.numerics.kernels as kernels
from abfp import ABFPConfig
from abfp import functional as AF
from abfp.numerics import ProductStats, analog_product, reference_product
from abfp.numerics.adc import draw_noise

sys.path.insert(0, str(Path(__file__).parent))
from device_strategies import device_configs  # noqa: E402


@pytest.fixture
def force_int8(monkeypatch):
    """int8 GEMMs for every product that can take them (whatever its size)."""

    def set_mode(on: bool) -> None:
        monkeypatch.setattr(kernels, "INT8_GEMM", on)  # whether or not this CPU's int8 GEMM is fast
        monkeypatch.setattr(kernels, "INT8_MIN_MACS", 0 if on else 1 << 62)
        monkeypatch.setattr(kernels, "INT8_MIN_TILE", 1 if on else 1 << 30)
        AF.clear_cache()

    return set_mode


configs8 = device_configs(max_dac_bits=8, gains=(0.5, 1.0, 3.0, 8.0, 64.0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs8, B=st.integers(1, 3), M=st.integers(1, 40), N=st.integers(1, 13), K=st.integers(1, 300),
       seed=st.integers(0, 2**31 - 1), shared_w=st.booleans(), noisy=st.booleans())
def test_int8_gemm_equals_float_gemm(force_int8, cfg, B, M, N, K, seed, shared_w, noisy):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, K, generator=g) * 3
    w = torch.randn(1 if shared_w else B, N, K, generator=g)
    T = -(-K // cfg.tile_width)
    e = draw_noise((B, T, M, N), cfg.replace(noise_std=1.0), g, torch.device("cpu")) if noisy else None
    outs = []
    for on in (True, False):
        force_int8(on)
        stats = ProductStats()
        y, mask = analog_product(x, w, cfg, noise=e, stats=stats, want_mask=True)
        outs.append((y, mask, stats.saturated, stats.conversions))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    assert outs[0][2:] == outs[1][2:]


def test_int8_path_is_taken_and_exact_on_the_default_device(force_int8):
    """The default 8/8/8 device at n = 128 runs on int8 and reproduces the reference exactly."""
    cfg = ABFPConfig(noise_std=0.0)
    force_int8(True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 515, generator=g)
    w = torch.randn(1, 48, 515, generator=g)
    from abfp.numerics import encode_weights

    we = encode_weights(w, cfg)
    assert we.codes_i8 is not None and kernels.use_int8(we, kernels.AdcPlan.for_config(cfg), 64)
    y, _ = analog_product(x, w, cfg)
    ref = reference_product(x, w, cfg)
    assert torch.equal(y.double(), ref.y) or float((y.double() - ref.y).abs().max()) <= 1e-5 * float(ref.y.abs().max())


def test_int8_gemm_only_where_the_cpu_makes_it_fast(monkeypatch):
    """Without a fast int8 GEMM on this CPU (``INT8_GEMM`` false) no product takes int8, however
    large; with it the default device's layer does; ``ABFP_INT8_GEMM`` overrides the detection."""
    cfg = ABFPConfig(noise_std=0.0)
    from abfp.numerics import encode_weights

    we = encode_weights(torch.randn(1, 48, 515), cfg)
    plan = kernels.AdcPlan.for_config(cfg)
    for on in (False, True):
        monkeypatch.setattr(kernels, "INT8_GEMM", on)
        assert kernels.use_int8(we, plan, 4096) is on
    for env, expected in (("0", False), ("1", True)):
        monkeypatch.setenv("ABFP_INT8_GEMM", env)
        assert kernels.int8_gemm_is_fast() is expected


def test_int8_is_off_above_eight_bits():
    plan = kernels.AdcPlan.for_config(ABFPConfig(input_bits=9))
    assert not plan.int8
    assert kernels.AdcPlan.for_config(ABFPConfig()).int8


geometries = st.fixed_dictionaries({
    "batch": st.integers(1, 3),
    "groups": st.sampled_from([1, 1, 2, 3]),
    "cin_per_group": st.integers(1, 6),
    "cout_per_group": st.integers(1, 5),
    "h": st.integers(3, 11),
    "w": st.integers(3, 11),
    "kh": st.integers(1, 3),
    "kw": st.integers(1, 3),
    "stride": st.integers(1, 2),
    "padding": st.integers(0, 2),
    "dilation": st.integers(1, 2),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geo=geometries, cfg=configs8 | st.builds(ABFPConfig, noise_std=st.just(0.0), input_bits=st.integers(9, 12),
                                                   gain=st.sampled_from([1.0, 3.0])),
       int8=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_inference_convolution_equals_the_gradient_path(force_int8, geo, cfg, int8, seed):
    g = torch.Generator().manual_seed(seed)
    G = geo["groups"]
    x = torch.randn(geo["batch"], G * geo["cin_per_group"], geo["h"], geo["w"], generator=g)
    wt = torch.randn(G * geo["cout_per_group"], geo["cin_per_group"], geo["kh"], geo["kw"], generator=g)
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], groups=G)
    hp = geo["h"] + 2 * geo["padding"] - geo["dilation"] * (geo["kh"] - 1)
    wp = geo["w"] + 2 * geo["padding"] - geo["dilation"] * (geo["kw"] - 1)
    if hp <= 0 or wp <= 0:
        return
    force_int8(int8)
    with torch.no_grad():
        fast = AF.conv2d(x, wt, **kw, config=cfg, cache=False)
    grad_path = AF.conv2d(x.clone().requires_grad_(True), wt, **kw, config=cfg, cache=False).detach()
    assert fast.shape == grad_path.shape
    # the same tile outputs; the float32 sum over tiles may run in another order
    scale = float(grad_path.abs().max()) if grad_path.numel() else 0.0
    torch.testing.assert_close(fast, grad_path, rtol=1e-5, atol=1e-6 * scale + 1e-30)


def test_inference_convolution_chunks_agree(monkeypatch):
    """Several images per chunk, one image per chunk and a few output rows per chunk agree."""
    cfg = ABFPConfig(noise_std=0.0, tile_width=32)
    x = torch.randn(5, 8, 13, 12)
    w = torch.randn(6, 8, 3, 3)
    with torch.no_grad():
        whole = AF.conv2d(x, w, padding=1, config=cfg)
        for budget in (8 * 9 * 12 * 13 * 2, 8 * 9 * 12 * 3, 1):
            monkeypatch.setattr(AF, "_IM2COL_ELEMENTS", budget)
            torch.testing.assert_close(AF.conv2d(x, w, padding=1, config=cfg), whole, rtol=0, atol=0)


def test_inference_convolution_noise_is_seeded_and_centred():
    cfg = ABFPConfig(noise_std=1.0, seed=None)
    x = torch.randn(4, 16, 10, 10)
    w = torch.randn(8, 16, 3, 3)
    with torch.no_grad():
        clean = AF.conv2d(x, w, padding=1, config=cfg.replace(noise_std=0.0))
        a = AF.conv2d(x, w, padding=1, config=cfg, generator=torch.Generator().manual_seed(5))
        b = AF.conv2d(x, w, padding=1, config=cfg, generator=torch.Generator().manual_seed(5))
        c = AF.conv2d(x, w, padding=1, config=cfg, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    diff = (a - clean) / clean.abs().max()
    assert float(diff.abs().max()) > 0
    assert abs(float(diff.mean())) < 0.1 * float(diff.std())  # centred: no bias from the noise


def test_chunked_setting_is_the_float_path_and_agrees_with_auto():
    """``kernel="chunked"`` keeps float32 GEMMs; ``"auto"`` takes int8 on a layer this size
    (where this CPU's int8 GEMM is fast, ``kernels.INT8_GEMM``): the same outputs, noise included."""
    x = torch.randn(1, 256, 512)
    w = torch.randn(1, 384, 512)
    outs = {}
    for kernel in ("auto", "chunked"):
        cfg = ABFPConfig(kernel=kernel, noise_std=1.0)
        outs[kernel], _ = analog_product(x, w, cfg, generator=torch.Generator().manual_seed(2))
    assert torch.equal(outs["auto"], outs["chunked"])


@pytest.mark.parametrize("layout", ["nchw", "input_cl", "weight_cl"])
def test_inference_convolution_output_layout_follows_torch(layout):
    """The output's memory format is F.conv2d's, so ``.view`` after the layer works as in float32."""
    import torch.nn.functional as F

    x = torch.randn(2, 8, 9, 9)
    w = torch.randn(6, 8, 3, 3)
    if layout == "input_cl":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "weight_cl":
        w = w.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = AF.conv2d(x, w, padding=1, config=ABFPConfig(noise_std=0.0))
    ref = F.conv2d(x, w, padding=1)
    assert y.stride() == ref.stride()
    if layout == "nchw":
        assert y.view(2, -1).shape == (2, 6 * 81)
