"""The fused narrow convolution kernel (:func:`abfp.numerics.fused.narrow_cols8`: tile products,
ADC and tile sum of width-8 tiles in one pass) gives the numbers of its reference, the batched
float32 GEMM plus :func:`abfp.numerics.fused.epilogue_cols4`, bit for bit, noise and clipped
counts included; and of the torch path and SPEC's float64 oracle."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import abfp.numerics.conv as conv
from abfp import ABFPConfig
from abfp import functional as AF
from abfp.numerics import AdcPlan, ProductStats, fused
from abfp.numerics.kernels import use_fused

sys.path.insert(0, str(Path(__file__).parent))
from device_strategies import conv_case, conv_geometries, device_configs  # noqa: E402
from kernel_spies import spied_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")

configs = (device_configs(max_dac_bits=8, gains=(0.5, 1.0, 2.0, 3.0, 8.0, 64.0), tile_widths=(8,))
           .map(lambda c: c.replace(bf16_tile_outputs=False)))

# output channels per group a multiple of 4 (the kernel's condition)
geometries = conv_geometries(cout_per_group=st.sampled_from([4, 8, 12]))


def _narrow(cfg: ABFPConfig) -> bool:
    """Whether a width-8 convolution under ``cfg`` takes the fused narrow kernel."""
    plan = AdcPlan.for_config(cfg)
    return use_fused(cfg, plan, torch.device("cpu"), wide=True) and not plan.wide and plan.gemm_dtype == torch.float32


def _run(monkeypatch, x, wt, kw, cfg, seed, *, narrow: bool = True, vnni: bool = False, compiled: bool = True,
         count: bool = True):
    """The convolution's output and clipped counts; ``vnni``: the VNNI form of the kernel may run
    (tests/numerics/test_vnni8.py), else this one."""
    monkeypatch.setattr(conv, "NARROW8", narrow)
    monkeypatch.setattr(conv, "VNNI8", vnni)
    monkeypatch.setattr(conv, "DIRECT_GROUPED", False)  # grouped ones would take fused.grouped_direct
    monkeypatch.setattr(fused, "AVAILABLE", compiled)
    AF.clear_cache()
    stats = ProductStats() if count else None
    with torch.no_grad():
        y = AF.conv2d(x, wt, **kw, config=cfg, generator=torch.Generator().manual_seed(seed), stats=stats)
    return y, None if stats is None else (stats.saturated, stats.conversions)


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geo=geometries, cfg=configs, std=st.sampled_from([0.0, 0.0, 0.3, 1.0, 3.0]), count=st.booleans(),
       stripe=st.sampled_from([7, 64, 1024]), seed=st.integers(0, 2**31 - 1))
def test_narrow_kernel_equals_the_gemm_and_epilogue(monkeypatch, geo, cfg, std, count, stripe, seed):
    """Random geometries (groups, strides, dilation, padding, layouts, kernel rows past the last
    full tile), converter settings, noise, with and without clipped counts, and work-item
    stripes that cut output rows and images anywhere."""
    cfg = cfg.replace(noise_std=std)
    x, wt, kw, ok = conv_case(geo, torch.Generator().manual_seed(seed))
    assume(ok)
    monkeypatch.setattr(fused, "NARROW_STRIPE", stripe)
    set_mode = spied_kernels(monkeypatch, {"narrow_cols8": "narrow"})
    calls = set_mode(True)
    y, st_ = _run(monkeypatch, x, wt, kw, cfg, seed, narrow=True, count=count)
    # a reduction shorter than 8 is one tile of its own length (the other paths take it)
    assert (calls["narrow"] > 0) == (_narrow(cfg) and geo["cin_per_group"] * geo["kh"] * geo["kw"] >= 8)
    y_ref, st_ref = _run(monkeypatch, x, wt, kw, cfg, seed, narrow=False, count=count)
    y_torch, st_torch = _run(monkeypatch, x, wt, kw, cfg, seed, narrow=True, compiled=False, count=count)
    assert y.shape == y_ref.shape and y.stride() == y_ref.stride()
    assert torch.equal(y, y_ref) and torch.equal(y, y_torch)
    assert st_ == st_ref == st_torch


@pytest.mark.parametrize("std", [0.0, 1.0])
def test_narrow_kernel_in_chunks_with_saturation(monkeypatch, std):
    """Several chunks of images and of output rows (a small patch budget), gain 8 so that
    outputs clip: the same numbers and counts as the reference, and the kernel ran."""
    set_mode = spied_kernels(monkeypatch, {"narrow_cols8": "narrow"})
    calls = set_mode(True)
    monkeypatch.setattr(conv, "PATCH_BYTES", 1 << 13)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 13, 9, generator=g) * 3
    wt = torch.randn(8, 6, 3, 3, generator=g)
    cfg = ABFPConfig(tile_width=8, gain=8.0, noise_std=std)
    kw = dict(stride=1, padding=1, dilation=1, groups=1)
    y, st_ = _run(monkeypatch, x, wt, kw, cfg, 9, narrow=True)
    assert calls["narrow"] > 3
    y_ref, st_ref = _run(monkeypatch, x, wt, kw, cfg, 9, narrow=False)
    assert torch.equal(y, y_ref) and st_ == st_ref and st_[0] > 0


def test_narrow_kernel_equals_the_float64_oracle(monkeypatch):
    """Noise off, several tiles per output: SPEC's float64 evaluation of the im2col product."""
    from test_fast_vs_reference import compare  # noqa: PLC0415  (tests/numerics is on sys.path)

    set_mode = spied_kernels(monkeypatch, {"narrow_cols8": "narrow"})
    calls = set_mode(True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 6, 6, generator=g)
    wt = torch.randn(12, 7, 3, 3, generator=g) / 10
    cfg = ABFPConfig(tile_width=8, gain=1.0, noise_std=0.0)
    y, _ = _run(monkeypatch, x, wt, dict(stride=1, padding=1, dilation=1, groups=1), cfg, 7, narrow=True)
    assert calls["narrow"] > 0
    x3 = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(1, 2 * 36, 63)
    counts = compare(y.permute(0, 2, 3, 1).reshape(1, 2 * 36, 12), x3, wt.reshape(1, 12, 63), cfg)
    assert counts["exempt"] <= max(2, 0.05 * counts["outputs"])
