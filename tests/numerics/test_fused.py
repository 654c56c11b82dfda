"""The compiled kernels (:mod:`abfp.numerics.fused`, numba) give the torch path's numbers bit
for bit: convolutions on random geometries (groups, strides, dilation, padding, layouts),
products on random shapes, every converter setting that takes them, with noise and
saturation statistics; and chunking does not change them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import abfp.numerics.conv as conv
from abfp import ABFPConfig
from abfp import functional as AF
from abfp.numerics import AdcPlan, ProductStats, analog_product, fused
from abfp.numerics.kernels import use_fused

sys.path.insert(0, str(Path(__file__).parent))
from device_strategies import conv_case, conv_geometries, device_configs  # noqa: E402
from kernel_spies import spied_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")

configs = (device_configs(max_dac_bits=10, gains=(0.5, 1.0, 3.0, 8.0, 64.0))
           .map(lambda c: c.replace(bf16_tile_outputs=False)))
noise = st.sampled_from([0.0, 0.0, 0.3, 1.0, 3.0])


@pytest.fixture
def compiled(monkeypatch):
    """``compiled(on)``: run with or without the compiled kernels; counts their calls."""
    return spied_kernels(monkeypatch, {"patch_encode": "conv", "patch_codes": "conv", "grouped_direct": "conv",
                                       "epilogue_rows": "rows"})


geometries = conv_geometries()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geo=geometries, cfg=configs, std=noise, seed=st.integers(0, 2**31 - 1))
def test_convolution_equals_the_torch_path(compiled, geo, cfg, std, seed):
    cfg = cfg.replace(noise_std=std)
    x, wt, kw, ok = conv_case(geo, torch.Generator().manual_seed(seed))
    assume(ok)
    outs = []
    for on in (True, False):
        calls = compiled(on)
        before = calls["conv"]
        stats = ProductStats()
        with torch.no_grad():
            y = AF.conv2d(x, wt, **kw, config=cfg, generator=torch.Generator().manual_seed(seed), stats=stats)
        outs.append((y, stats))
        # the compiled path runs wherever the configuration allows it
        # (wide plans included: float64 ADC arithmetic in fused.epilogue_cols)
        assert (calls["conv"] > before) == (on and use_fused(cfg, AdcPlan.for_config(cfg), x.device, wide=True))
    (a, sa), (b, sb) = outs
    assert a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(a, b)
    assert (sa.saturated, sa.conversions) == (sb.saturated, sb.conversions)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs, std=noise, B=st.integers(1, 3), M=st.integers(1, 40), N=st.integers(1, 40),
       K=st.integers(1, 300), shared_w=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_product_equals_the_torch_path(compiled, cfg, std, B, M, N, K, shared_w, seed):
    cfg = cfg.replace(noise_std=std)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, K, generator=g) * 3
    w = torch.randn(1 if shared_w else B, N, K, generator=g)
    outs = []
    for on in (True, False):
        compiled(on)
        stats = ProductStats()
        y, _ = analog_product(x, w, cfg, generator=torch.Generator().manual_seed(seed), stats=stats)
        outs.append((y, stats))
    (a, sa), (b, sb) = outs
    assert torch.equal(a, b)
    assert (sa.saturated, sa.conversions) == (sb.saturated, sb.conversions)


def test_compiled_kernels_run_on_the_default_device(compiled):
    calls = compiled(True)
    cfg = ABFPConfig()
    with torch.no_grad():
        AF.conv2d(torch.randn(2, 16, 8, 8), torch.randn(8, 16, 3, 3), padding=1, config=cfg)
        AF.linear(torch.randn(4, 64), torch.randn(8, 64), config=cfg)
    assert calls["conv"] > 0 and calls["rows"] > 0


@pytest.mark.parametrize("budget", [1, 200, 3000, 1 << 30])
def test_convolution_chunks_agree(monkeypatch, budget):
    """One output row, a few rows, a few images or the whole batch per chunk: same numbers
    (noise is indexed by position, not drawn per chunk)."""
    cfg = ABFPConfig(tile_width=32, noise_std=1.0, seed=3)
    x = torch.randn(5, 8, 13, 12)
    w = torch.randn(6, 8, 3, 3)
    with torch.no_grad():
        AF.reseed()  # seeded functional calls continue one stream: restart it for each
        whole = AF.conv2d(x, w, padding=1, config=cfg)
        monkeypatch.setattr(conv, "PATCH_BYTES", budget)
        monkeypatch.setattr(conv, "CHUNK_ELEMENTS", budget)
        AF.reseed()
        assert torch.equal(AF.conv2d(x, w, padding=1, config=cfg), whole)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_takes_the_torch_path_with_the_same_numbers():
    """GNU OpenMP cannot run in a child forked after its threads ran (numba would terminate
    the child): there the torch path runs instead (with one torch thread, as torch needs)."""
    cfg = ABFPConfig(seed=4)
    x, w = torch.randn(2, 16, 8, 8), torch.randn(8, 16, 3, 3)
    with torch.no_grad():
        AF.reseed()  # seeded functional calls continue one stream: restart it for each
        parent = AF.conv2d(x, w, padding=1, config=cfg)
    assert not fused.usable() or fused._launched_in == os.getpid()
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            torch.set_num_threads(1)
            with torch.no_grad():
                AF.reseed()
                child = AF.conv2d(x, w, padding=1, config=cfg)
            code = 0 if (torch.equal(child, parent) and not fused.usable()) else 2
        finally:
            os.write(wfd, bytes([code]))
            os._exit(0)
    os.close(wfd)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    assert got == bytes([0])


def test_bfloat16_scales_round_as_torch_rounds_ties_included():
    """The in-kernel bfloat16 rounding of block scales equals torch's conversion, on exact
    ties (low 16 bits 0x8000, both parities), their neighbours and random values."""
    import numpy as np

    base = torch.randint(0, 0x7F7F, (2000,), dtype=torch.int32) << 16
    low = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF], dtype=torch.int32)
    bits = (base.view(-1, 1) | low.view(1, -1)).flatten()
    vals = bits.view(torch.float32)
    vals = torch.cat([vals, torch.rand(5000) * 10 ** torch.randint(-30, 30, (5000,)).float()])
    vals = vals[torch.isfinite(vals)].abs().contiguous()
    L = vals.numel()
    xs = vals.view(1, 1, L).numpy()
    scales = np.zeros((1, 1, 1, L), np.float32)
    codes = np.zeros((1, 1, L), np.int8)
    one = np.zeros(1, np.int64)
    fused.patch_encode(xs, one, one, 1, 1, True, np.float32(127), False, scales, codes)
    assert torch.equal(torch.from_numpy(scales).flatten(), vals.to(torch.bfloat16).float())


@pytest.mark.parametrize("cout, groups", [(8, 1), (16, 2), (12, 3)])
def test_four_channel_epilogue_equals_the_torch_path(monkeypatch, cout, groups):
    """Output channels per group a multiple of 4: :func:`fused.epilogue_cols4` (one noise hash per
    four channels) gives the torch path's numbers and clipped count, with noise and saturation."""
    set_mode = spied_kernels(monkeypatch, {"epilogue_cols4": "four"})
    monkeypatch.setattr(conv, "DIRECT_GROUPED", False)  # grouped ones would take fused.grouped_direct
    monkeypatch.setattr(conv, "NARROW8", False)  # width 8 otherwise takes fused.narrow_cols8 (test_narrow_cols8.py)
    g = torch.Generator().manual_seed(cout)
    x = torch.randn(2, 2 * groups, 9, 13, generator=g) * 2
    wt = torch.randn(cout, 2, 3, 3, generator=g)
    cfg = ABFPConfig(tile_width=8, gain=8.0, noise_std=1.0)
    outs = []
    for on in (True, False):
        calls = set_mode(on)
        stats = ProductStats()
        with torch.no_grad():
            y = AF.conv2d(x, wt, padding=1, stride=(1, 2), groups=groups, config=cfg,
                          generator=torch.Generator().manual_seed(5), stats=stats)
        outs.append((y, stats.saturated, stats.conversions))
    assert calls["four"] > 0
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1:] == outs[1][1:] and outs[0][1] > 0


@pytest.mark.parametrize("bits,n", [((10, 10, 12), 128), ((8, 8, 12), 32), ((10, 9, 11), 32), ((12, 12, 14), 64)])
@pytest.mark.parametrize("std", [0.0, 0.3])
def test_wide_convolution_equals_the_torch_path_and_the_float64_oracle(monkeypatch, bits, n, std):
    """Wide plans (AdcPlan form C: the ADC step in float64; with n L(b_x) L(b_w) > 2**24 float64
    tile products too) run through fused.epilogue_cols (float64 ADC arithmetic): the torch path's numbers bit for
    bit, and SPEC's float64 oracle on the convolution's patches (several tiles per output)."""
    from test_fast_vs_reference import compare  # noqa: PLC0415  (tests/numerics is on sys.path)

    set_mode = spied_kernels(monkeypatch, {"epilogue_cols": "wide"})
    wb, xb, yb = bits
    cfg = ABFPConfig(tile_width=n, weight_bits=wb, input_bits=xb, output_bits=yb, gain=8.0, noise_std=std)
    assert AdcPlan.for_config(cfg).wide
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 7, 7, generator=g)
    wt = torch.randn(12, 40, 3, 3, generator=g) / 10
    outs = []
    for on in (True, False):
        calls = set_mode(on)
        before = calls["wide"]
        stats = ProductStats()
        with torch.no_grad():
            y = AF.conv2d(x, wt, padding=1, config=cfg, generator=torch.Generator().manual_seed(7), stats=stats)
        assert (calls["wide"] > before) == on
        outs.append((y, stats))
    (a, sa), (b, sb) = outs
    assert torch.equal(a, b)
    assert (sa.saturated, sa.conversions) == (sb.saturated, sb.conversions)
    # the oracle: rows are the positions of every image in turn (the convolution's noise index)
    x3 = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(1, 2 * 49, 360)
    counts = compare(a.permute(0, 2, 3, 1).reshape(1, 2 * 49, 12), x3, wt.reshape(1, 12, 360), cfg, gen_seed=7)
    assert counts["exempt"] <= max(2, 0.05 * counts["outputs"])
    assert counts["adc_flips"] <= max(1, 0.002 * counts["outputs"])
