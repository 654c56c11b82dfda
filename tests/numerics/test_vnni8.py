"""The VNNI form of the width-8 convolution kernel (:func:`abfp.numerics.vnni8.narrow_cols8_vnni`:
int8 dot products with ``vpdpbusd``) gives the numbers of :func:`abfp.numerics.fused.narrow_cols8`
(float32 dot products), of the batched GEMM plus epilogue and of the torch path, bit for bit,
noise and clipped counts included."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import abfp.numerics.conv as conv
from abfp import ABFPConfig
from abfp.numerics import AdcPlan, ProductStats, analog_product, fused, kernels, vnni8

sys.path.insert(0, str(Path(__file__).parent))
from device_strategies import conv_case, conv_geometries, device_configs  # noqa: E402
from test_narrow_cols8 import _run  # noqa: E402

# the kernel tests need the kernels; the packing tests are plain torch and run anywhere
needs_vnni = pytest.mark.skipif(not vnni8.USABLE, reason="needs numba and a CPU with AVX-512 VNNI")

configs = (device_configs(max_dac_bits=8, gains=(0.5, 1.0, 2.0, 8.0, 64.0), tile_widths=(8,))
           .map(lambda c: c.replace(bf16_tile_outputs=False)))
geometries = conv_geometries(cout_per_group=st.sampled_from([4, 8, 12]))


def _spy(monkeypatch, name: str = "narrow_cols8_vnni") -> dict[str, int]:
    calls = {"vnni": 0}
    real = getattr(vnni8, name)

    def spy(*a):
        calls["vnni"] += 1
        return real(*a)

    monkeypatch.setattr(vnni8, name, spy)
    return calls


def _takes_vnni(cfg: ABFPConfig, kg: int) -> bool:
    """Whether a width-8 product with ``kg`` reduction values (per group) runs a VNNI kernel."""
    plan = AdcPlan.for_config(cfg)
    return (kg >= 8 and not plan.wide and plan.gemm_dtype == torch.float32 and plan.int8
            and plan.int_ratio()[0] == 1.0)


def _product(monkeypatch, x, w, cfg, seed, *, vnni: bool, compiled: bool = True):
    monkeypatch.setattr(kernels, "VNNI8", vnni)
    monkeypatch.setattr(fused, "AVAILABLE", compiled)
    stats = ProductStats()
    y, _ = analog_product(x, w, cfg, generator=torch.Generator().manual_seed(seed), stats=stats)
    return y, (stats.saturated, stats.conversions)


@needs_vnni
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs, std=st.sampled_from([0.0, 0.3, 1.0, 3.0]), B=st.integers(1, 3), M=st.integers(1, 40),
       N=st.integers(1, 300), K=st.integers(1, 120), shared_w=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_vnni_rows_equal_the_float_kernel_and_the_torch_path(monkeypatch, cfg, std, B, M, N, K, shared_w, seed):
    """Linear layers and batched products (per-batch weights: attention) at tile width 8: the
    VNNI kernel (column counts across its blocks of 32, partial last blocks, noise indices at
    every lane of a hash; row counts that are and are not multiples of its row groups of 4;
    reductions not a multiple of 8) gives :func:`.fused.narrow_rows`'s numbers
    and the torch path's, clipped counts included."""
    cfg = cfg.replace(noise_std=std)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, K, generator=g) * 3
    w = torch.randn(1 if shared_w else B, N, K, generator=g)
    calls = _spy(monkeypatch, "narrow_rows8_vnni")
    y, st_ = _product(monkeypatch, x, w, cfg, seed, vnni=True)
    assert (calls["vnni"] > 0) == _takes_vnni(cfg, K)
    y_float, st_float = _product(monkeypatch, x, w, cfg, seed, vnni=False)
    y_torch, st_torch = _product(monkeypatch, x, w, cfg, seed, vnni=True, compiled=False)
    assert torch.equal(y, y_float) and torch.equal(y, y_torch)
    assert st_ == st_float == st_torch


@needs_vnni
@pytest.mark.parametrize("budget", [1 << 10, 1 << 14, 1 << 19])
@pytest.mark.parametrize("gain", [1.0, 16.0])
def test_vnni_rows_in_chunks_with_saturation(monkeypatch, budget, gain):
    """Chunks of rows (row offsets in the noise index), codes at full scale, gain 16 so that
    many samples clip: the float kernel's numbers and counts, the same in every chunking."""
    calls = _spy(monkeypatch, "narrow_rows8_vnni")
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", budget)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 70, 200, generator=g), torch.randn(1, 320, 200, generator=g)
    x[:, ::3] = x[:, ::3].sign()  # rows of +-127 codes
    w[::2] = -1.0
    cfg = ABFPConfig(tile_width=8, gain=gain, noise_std=1.0)
    y, st_ = _product(monkeypatch, x, w, cfg, 7, vnni=True)
    assert calls["vnni"] > 0
    y_float, st_float = _product(monkeypatch, x, w, cfg, 7, vnni=False)
    assert torch.equal(y, y_float) and st_ == st_float
    assert gain == 1 or st_[0] > 0


@needs_vnni
@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geo=geometries, cfg=configs, std=st.sampled_from([0.0, 0.0, 0.3, 1.0, 3.0]), count=st.booleans(),
       stripe=st.sampled_from([7, 16, 64, 1024]), seed=st.integers(0, 2**31 - 1))
def test_vnni_kernel_equals_the_float_kernel_and_the_reference(monkeypatch, geo, cfg, std, count, stripe, seed):
    """Random geometries (groups, strides, dilation, padding, layouts, reductions that are not a
    multiple of 8), converter settings, noise, with and without clipped counts, and stripes of
    positions that are and are not whole vectors of 16."""
    cfg = cfg.replace(noise_std=std)
    x, wt, kw, ok = conv_case(geo, torch.Generator().manual_seed(seed))
    assume(ok)
    monkeypatch.setattr(fused, "NARROW_STRIPE", stripe)
    calls = _spy(monkeypatch)
    y, st_ = _run(monkeypatch, x, wt, kw, cfg, seed, vnni=True, count=count)
    assert (calls["vnni"] > 0) == _takes_vnni(cfg, geo["cin_per_group"] * geo["kh"] * geo["kw"])
    y_float, st_float = _run(monkeypatch, x, wt, kw, cfg, seed, vnni=False, count=count)
    y_ref, st_ref = _run(monkeypatch, x, wt, kw, cfg, seed, vnni=False, narrow=False, count=count)
    y_torch, st_torch = _run(monkeypatch, x, wt, kw, cfg, seed, vnni=True, compiled=False, count=count)
    assert y.shape == y_ref.shape and y.stride() == y_ref.stride()
    assert torch.equal(y, y_float) and torch.equal(y, y_ref) and torch.equal(y, y_torch)
    assert st_ == st_float == st_ref == st_torch


@needs_vnni
@pytest.mark.parametrize("std", [0.0, 1.0])
@pytest.mark.parametrize("gain", [1.0, 8.0])
def test_vnni_kernel_in_chunks_with_saturation(monkeypatch, std, gain):
    """Several chunks of images and of output rows, codes at full scale (+-127: the offset bytes
    reach 255 and 1), gain 8 so that outputs clip: the numbers and counts of the float kernel."""
    calls = _spy(monkeypatch)
    monkeypatch.setattr(conv, "PATCH_BYTES", 1 << 13)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 13, 9, generator=g) * 3
    x[:, :, ::2] = x[:, :, ::2].sign() * 5  # many blocks whose values are all +-max: codes +-127
    wt = torch.randn(8, 6, 3, 3, generator=g)
    wt[::2] = -1.0  # rows of -127 codes
    cfg = ABFPConfig(tile_width=8, gain=gain, noise_std=std)
    kw = dict(stride=1, padding=1, dilation=1, groups=1)
    y, st_ = _run(monkeypatch, x, wt, kw, cfg, 9, vnni=True)
    assert calls["vnni"] > 3
    y_float, st_float = _run(monkeypatch, x, wt, kw, cfg, 9, vnni=False)
    assert torch.equal(y, y_float) and st_ == st_float
    assert gain == 1 or st_[0] > 0


@needs_vnni
@pytest.mark.parametrize("mode", ["abfp", "fixed"])
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float32", "pow2"])
def test_vnni_kernel_across_scale_formats(monkeypatch, mode, scale_dtype):
    """8/8/8 (the VNNI kernel's case) in every input scale format, fixed-point scales included
    (their scales are copied where the kernel may read past them): the float kernel's numbers."""
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 11, 7, generator=g)
    wt = torch.randn(12, 5, 3, 2, generator=g)
    cfg = ABFPConfig(tile_width=8, gain=2.0, noise_std=0.5, mode=mode, scale_dtype=scale_dtype)
    kw = dict(stride=(2, 1), padding=(1, 0), dilation=1, groups=1)
    y, st_ = _run(monkeypatch, x, wt, kw, cfg, 5, vnni=True)
    assert calls["vnni"] > 0
    y_float, st_float = _run(monkeypatch, x, wt, kw, cfg, 5, vnni=False)
    assert torch.equal(y, y_float) and st_ == st_float


def test_pack_weights_words_give_the_tile_products():
    """The packed words and corrections, evaluated as ``vpdpbusd`` does (unsigned bytes ``x + 128``
    times signed bytes, four per word), give the exact tile products, by an independent
    integer evaluation."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (2, 3, 8, 12), generator=g, dtype=torch.int8)
    x = torch.randint(-127, 128, (8, 5), generator=g, dtype=torch.int64)  # one tile, 5 positions
    words, corr = vnni8.pack_weights(w)
    assert words.shape == (2, 3, 12, 2) and words.dtype == np.int32 and corr.shape == (2, 3, 12)
    wb = words.view(np.int8).reshape(2, 3, 12, 8).astype(np.int64)  # each word's bytes, in order
    xu = (x.numpy() + 128).T  # (positions, 8) unsigned
    d = np.einsum("pk,gtok->gtop", xu, wb) + corr[..., None]
    expect = np.einsum("kp,gtko->gtop", x.numpy(), w.numpy().astype(np.int64))
    assert np.array_equal(d, expect)


def test_pack_rows_words_give_the_tile_products():
    """:func:`vnni8.pack_rows`'s words (unsigned bytes ``w + 128``) times signed input codes,
    less ``128 sum x``, are the exact tile products (independent integer evaluation)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (2, 3, 8, 40), generator=g, dtype=torch.int8)
    scales = torch.rand(2, 3, 40, generator=g)
    x = torch.randint(-127, 128, (5, 3, 8), generator=g, dtype=torch.int64)  # rows, tiles, codes
    words, sp = vnni8.pack_rows(w, scales)
    assert words.shape == (2, 3, 2, 64) and words.dtype == torch.int32  # 40 columns padded to 64
    assert torch.equal(sp[..., :40], scales) and not sp[..., 40:].any()
    wu = words.contiguous().view(torch.uint8).reshape(2, 3, 2, 64, 4).to(torch.int64)  # (b, t, h, j, byte)
    d = torch.einsum("rthi,bthji->btrj", x.reshape(5, 3, 2, 4), wu) - 128 * x.sum(-1).T[None, :, :, None]
    expect = torch.einsum("rtk,btkj->btrj", x, w.to(torch.int64))
    assert torch.equal(d[..., :40], expect)
    assert torch.equal(d[..., 40:], torch.zeros_like(d[..., 40:]))  # zero codes: the offset cancels


def test_pack_weights_rejects_other_shapes():
    with pytest.raises(ValueError, match="int8"):
        vnni8.pack_weights(torch.zeros(1, 2, 8, 4))
    with pytest.raises(ValueError, match="int8"):
        vnni8.pack_weights(torch.zeros(1, 2, 16, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        vnni8.pack_rows(torch.zeros(1, 2, 8, 4, dtype=torch.int32), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="do not match"):
        vnni8.pack_rows(torch.zeros(1, 2, 8, 4, dtype=torch.int8), torch.zeros(1, 2, 5))


@needs_vnni
@pytest.mark.parametrize("gain", [1.0, 256.0])
def test_a_wanted_clamp_mask_is_marked_at_width_8(gain: float) -> None:
    """QAT asks for the clamp mask; the VNNI rows kernel does not mark it, so a product that
    wants one runs the float32 narrow kernel: the mask and the output equal the torch path's
    (found by CI: n = 8 products with want_mask=True returned an all-True mask)."""
    g = torch.Generator().manual_seed(5)
    x3, w3 = torch.randn(1, 40, 64, generator=g), torch.randn(1, 32, 64, generator=g)
    cfg = ABFPConfig(tile_width=8, gain=gain, noise_std=0.0)
    runs = []
    for compiled in (True, False):
        saved = fused.AVAILABLE
        fused.AVAILABLE = compiled and saved
        try:
            stats = ProductStats()
            y, mask = analog_product(x3, w3, cfg, want_mask=True, key=7, stats=stats)
        finally:
            fused.AVAILABLE = saved
        runs.append((y, mask, stats.saturated))
    (y1, m1, s1), (y2, m2, s2) = runs
    assert torch.equal(m1, m2) and torch.equal(y1, y2) and s1 == s2 == int((~m1).sum())
    assert (s1 > 0) == (gain > 1)  # G = 256 clips, G = 1 does not
