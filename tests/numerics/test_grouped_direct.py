"""The direct grouped-convolution kernel (:func:`abfp.numerics.fused.grouped_direct`): depthwise
and grouped convolutions without patch codes or tile products in memory give, bit for bit, the
numbers of the path it replaces (patch codes, a batched GEMM per group and the compiled
epilogue) and of the torch path, with the same clipped counts; and they meet SPEC's float64
oracle on the convolution's patches, one group per batch of the product."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
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

configs = (device_configs(max_dac_bits=12, gains=(0.5, 1.0, 3.0, 8.0, 64.0), tile_widths=(1, 3, 4, 8, 9, 16, 128))
           .map(lambda c: c.replace(bf16_tile_outputs=False)))

geometries = conv_geometries(groups=(2, 3, 5, 8, 16), cin_per_group=st.sampled_from([1, 1, 1, 2, 3]),
                             cout_per_group=st.sampled_from([1, 1, 2, 3, 4, 8]), size=(3, 15), kernel=((1, 5), (1, 5)))


def _run(x, wt, kw, cfg, seed):
    stats = ProductStats()
    with torch.no_grad():
        y = AF.conv2d(x, wt, **kw, config=cfg, generator=torch.Generator().manual_seed(seed), stats=stats)
    return y, stats.saturated, stats.conversions


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geo=geometries, cfg=configs, std=st.sampled_from([0.0, 0.0, 0.2887, 1.0, 3.0]), seed=st.integers(0, 2**31 - 1))
def test_direct_kernel_equals_the_patch_path_and_the_torch_path(monkeypatch, geo, cfg, std, seed):
    cfg = cfg.replace(noise_std=std)
    x, wt, kw, ok = conv_case(geo, torch.Generator().manual_seed(seed))
    assume(ok)
    set_mode = spied_kernels(monkeypatch, {"grouped_direct": "direct", "patch_encode": "patch", "patch_codes": "patch"})
    outs = []
    for direct, compiled in ((True, True), (False, True), (False, False)):
        monkeypatch.setattr(conv, "DIRECT_GROUPED", direct)
        calls = set_mode(compiled)
        before = dict(calls)
        outs.append(_run(x, wt, kw, cfg, seed))
        ran_direct = calls["direct"] > before["direct"]
        ran_patches = calls["patch"] > before["patch"]
        if direct and compiled and use_fused(cfg, AdcPlan.for_config(cfg), x.device, wide=True):
            assert ran_direct != ran_patches  # the direct kernel or the patch path, never both
            # pow2 scales (rounded by torch) and int8 GEMMs (at most INT8_MAX_GROUPS groups) keep the patches
            assert ran_direct or cfg.scale_dtype == "pow2" or kw["groups"] <= conv.INT8_MAX_GROUPS
        else:
            assert not ran_direct
    (a, *sa), *rest = outs
    for b, *sb in rest:
        assert a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)
        assert sa == sb


@pytest.mark.parametrize("bits,n,gain", [((8, 8, 8), 128, 8.0), ((8, 8, 8), 8, 1.0), ((10, 10, 12), 128, 8.0),
                                         ((11, 11, 16), 128, 8.0), ((12, 12, 14), 4, 2.0), ((6, 6, 8), 3, 1.0)])
@pytest.mark.parametrize("std", [0.0, 0.2887])
@pytest.mark.parametrize("mode", ["abfp", "fixed"])
def test_depthwise_meets_the_float64_oracle(monkeypatch, bits, n, gain, std, mode):
    """EfficientNet's depthwise 3x3 (stride 2, K = 9 per group: one partial tile, or several
    when n < 9) and a grouped 3x3 with two outputs per group, through the direct kernel,
    against SPEC's float64 evaluation (the oracle of ``test_fast_vs_reference``) of each group's
    patches: the product's batch is the group, its rows every image's positions in turn (the
    convolution's noise index)."""
    from test_fast_vs_reference import compare  # noqa: PLC0415  (tests/numerics is on sys.path)

    set_mode = spied_kernels(monkeypatch, {"grouped_direct": "direct"})
    calls = set_mode(True)
    wb, xb, yb = bits
    cfg = ABFPConfig(mode=mode, tile_width=n, weight_bits=wb, input_bits=xb, output_bits=yb, gain=gain, noise_std=std)
    g = torch.Generator().manual_seed(11)
    for G, cg, ng in ((24, 1, 1), (6, 2, 2)):
        x = torch.randn(2, G * cg, 9, 10, generator=g)
        wt = torch.randn(G * ng, cg, 3, 3, generator=g) / 3
        before = calls["direct"]
        scale = float(x.abs().max()) if mode == "fixed" else None
        with torch.no_grad():
            y = AF.conv2d(x, wt, stride=2, padding=1, groups=G, config=cfg, input_scale=scale,
                          generator=torch.Generator().manual_seed(7))
        assert calls["direct"] > before
        B, _, ho, wo = y.shape
        kg = cg * 9
        cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(B * ho * wo, G, kg).permute(1, 0, 2)
        rows = y.reshape(B, G, ng, ho * wo).permute(1, 0, 3, 2).reshape(G, B * ho * wo, ng)
        extra = {} if mode == "abfp" else {"input_scale": scale, "weight_scale": float(wt.abs().max())}
        counts = compare(rows, cols, wt.reshape(G, ng, kg), cfg, gen_seed=7, **extra)
        assert counts["exempt"] <= max(2, 0.05 * counts["outputs"])
        assert counts["adc_flips"] <= max(1, 0.002 * counts["outputs"])


@pytest.mark.parametrize("budget", [1, 300, 5000, 1 << 30])
def test_direct_kernel_chunks_agree(monkeypatch, budget):
    """One output row, a few rows, a few images or the whole batch per chunk, and blocks of a few
    rows inside the kernel: the same numbers (noise is indexed by position)."""
    cfg = ABFPConfig(tile_width=128, input_bits=10, weight_bits=10, output_bits=12, noise_std=1.0, seed=3)
    x = torch.randn(5, 12, 23, 17)
    w = torch.randn(12, 1, 3, 3)
    with torch.no_grad():
        AF.reseed()
        whole = AF.conv2d(x, w, padding=1, groups=12, config=cfg)
        monkeypatch.setattr(conv, "PATCH_BYTES", budget)
        monkeypatch.setattr(conv, "CHUNK_ELEMENTS", budget)
        monkeypatch.setattr(conv, "PHASE_ELEMENTS", budget)
        monkeypatch.setattr(fused, "DIRECT_ELEMENTS", max(1, budget // 100))
        AF.reseed()
        assert torch.equal(AF.conv2d(x, w, padding=1, groups=12, config=cfg), whole)
