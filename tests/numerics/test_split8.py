"""Wide plans' tile products as four int8 GEMMs on split codes (:func:`abfp.numerics.conv.split8_tiles`):
9-12-bit DACs at n = 128 need float64 tile products; the split path computes the same integers
with exact int32 sums, so a convolution gives bit for bit the numbers (and clipped counts) of the
float64 GEMM (``conv.SPLIT8 = False``) and of the torch path, and SPEC's float64 oracle."""

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
from abfp.numerics import AdcPlan, ProductStats, fused, kernels

sys.path.insert(0, str(Path(__file__).parent))
from device_strategies import conv_case, conv_geometries  # noqa: E402
from kernel_spies import spied_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")

# wide plans with float64 tile products (n L(b_x) L(b_w) > 2**24) and some narrower ones
configs = st.builds(ABFPConfig, mode=st.sampled_from(["abfp", "abfp", "fixed"]), tile_width=st.sampled_from([32, 64, 128]),
                    input_bits=st.integers(8, 12), weight_bits=st.integers(8, 12), output_bits=st.integers(4, 16),
                    gain=st.sampled_from([1.0, 3.0, 8.0, 16.0]), scale_dtype=st.sampled_from(["bfloat16", "float32", "pow2"]))
geometries = conv_geometries(groups=(1, 1, 2), cin_per_group=st.integers(1, 40), cout_per_group=st.integers(1, 9),
                             size=(3, 9), kernel=((1, 3), (1, 3)))


@pytest.fixture
def split_everywhere(monkeypatch):
    """The split path on every shape (the size thresholds are speed, not numerics) and the int8
    GEMM on (exact on every CPU; only slow without VNNI)."""
    monkeypatch.setattr(conv, "SPLIT8_MIN_ROWS", 1)
    monkeypatch.setattr(conv, "SPLIT8_MIN_OUTPUTS", 1)
    monkeypatch.setattr(kernels, "INT8_GEMM", True)
    calls = {"split": 0}
    real = conv.split8_tiles

    def spy(*a):
        calls["split"] += 1
        return real(*a)

    monkeypatch.setattr(conv, "split8_tiles", spy)
    return calls


def _run(x, wt, kw, cfg, seed):
    stats = ProductStats()
    with torch.no_grad():
        y = AF.conv2d(x, wt, **kw, config=cfg, generator=torch.Generator().manual_seed(seed), stats=stats)
    return y, stats.saturated, stats.conversions


def test_split_reassembles_every_code():
    q = torch.arange(-2047, 2048, dtype=torch.float32)
    hi, lo = torch.empty(q.shape, dtype=torch.int8), torch.empty(q.shape, dtype=torch.int8)
    conv.split8_(q, hi, lo)
    assert torch.equal(hi.double() * 32 + lo.double(), q.double())
    assert int(lo.min()) == -16 and int(lo.max()) == 15 and int(hi.abs().max()) == conv._split_high(2047) == 64


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geo=geometries, cfg=configs, std=st.sampled_from([0.0, 0.2887, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_split_path_equals_the_float64_gemm_and_the_torch_path(monkeypatch, split_everywhere, geo, cfg, std, seed):
    cfg = cfg.replace(noise_std=std)
    x, wt, kw, ok = conv_case(geo, torch.Generator().manual_seed(seed))
    assume(ok)
    set_mode = spied_kernels(monkeypatch, {})
    plan = AdcPlan.for_config(cfg)
    outs = []
    for split, compiled in ((True, True), (False, True), (False, False)):
        monkeypatch.setattr(conv, "SPLIT8", split)
        set_mode(compiled)
        before = split_everywhere["split"]
        outs.append(_run(x, wt, kw, cfg, seed))
        ran = split_everywhere["split"] > before
        # wide plans with float64 tile products take it, but grouped ones the direct kernel takes
        direct = geo["groups"] > 1 and geo["cout_per_group"] <= conv.DIRECT_MAX_OUTPUTS and cfg.scale_dtype != "pow2"
        assert ran == (split and compiled and plan.wide and plan.gemm_dtype == torch.float64 and not direct)
    (a, *sa), *rest = outs
    for b, *sb in rest:
        assert a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)
        assert sa == sb


@pytest.mark.parametrize("bits", [(11, 11, 16), (10, 10, 12), (12, 12, 14), (9, 12, 8)])
@pytest.mark.parametrize("std", [0.0, 0.2887])
@pytest.mark.parametrize("mode", ["abfp", "fixed"])
def test_pointwise_meets_the_float64_oracle(split_everywhere, bits, std, mode):
    """An EfficientNet-like pointwise convolution (K = 200: a full tile and a partial one) on the
    split path, against SPEC's float64 evaluation of its patches (the oracle of
    ``test_fast_vs_reference``)."""
    from test_fast_vs_reference import compare  # noqa: PLC0415  (tests/numerics is on sys.path)

    wb, xb, yb = bits
    cfg = ABFPConfig(mode=mode, tile_width=128, weight_bits=wb, input_bits=xb, output_bits=yb, gain=8.0, noise_std=std)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 200, 5, 6, generator=g)
    wt = torch.randn(72, 200, 1, 1, generator=g) / 10
    scale = float(x.abs().max()) if mode == "fixed" else None
    before = split_everywhere["split"]
    with torch.no_grad():
        y = AF.conv2d(x, wt, config=cfg, input_scale=scale, generator=torch.Generator().manual_seed(7))
    assert split_everywhere["split"] > before
    B, N, ho, wo = y.shape
    cols = F.unfold(x, 1).transpose(1, 2).reshape(1, B * ho * wo, 200)
    rows = y.permute(0, 2, 3, 1).reshape(1, B * ho * wo, N)
    extra = {} if mode == "abfp" else {"input_scale": scale, "weight_scale": float(wt.abs().max())}
    counts = compare(rows, cols, wt.reshape(1, N, 200), cfg, gen_seed=7, **extra)
    assert counts["exempt"] <= max(2, 0.05 * counts["outputs"])
    assert counts["adc_flips"] <= max(1, 0.002 * counts["outputs"])


def test_the_split_is_refused_where_it_is_not_exact_or_not_faster():
    from abfp.numerics import encode_weights  # noqa: PLC0415

    wide = ABFPConfig(tile_width=128, input_bits=11, weight_bits=11, output_bits=16, gain=8.0)
    e = encode_weights(torch.randn(1, 96, 256), wide)
    plan = AdcPlan.for_config(wide)
    if kernels.INT8_GEMM:
        assert conv.use_split8(wide, plan, e, 1, 256, False, False)
    assert not conv.use_split8(wide, plan, e, 1, 16, False, False)  # a short reduction loses
    assert not conv.use_split8(wide, plan, encode_weights(torch.randn(1, 24, 256), wide), 1, 256, False, False)
    narrow = wide.replace(input_bits=8, weight_bits=8, output_bits=8)
    assert not conv.use_split8(narrow, AdcPlan.for_config(narrow), e, 1, 256, False, False)  # float32 GEMM already
    huge = wide.replace(input_bits=14, weight_bits=14)  # halves beyond int8 / partial sums beyond int32
    assert not conv.use_split8(huge, AdcPlan.for_config(huge), e, 1, 256, False, False)
