"""The narrow-tile kernel (:func:`abfp.numerics.fused.narrow_rows`: tile products, ADC and tile
sum in one pass for tiles narrower than 32) gives the torch path's numbers bit for bit, noise
and saturation counts included, on random shapes and configurations; it runs where it should;
chunking does not change its numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abfp import ABFPConfig
from abfp import functional as AF
from abfp.numerics import AdcPlan, ProductStats, analog_product, fused, kernels

sys.path.insert(0, str(Path(__file__).parent))
from device_strategies import device_configs  # noqa: E402
from kernel_spies import spied_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")

narrow_configs = (device_configs(max_dac_bits=8, gains=(0.5, 1.0, 3.0, 8.0, 64.0), tile_widths=(1, 2, 3, 5, 8, 13, 16, 31))
                  .map(lambda c: c.replace(bf16_tile_outputs=False)))


@pytest.fixture
def narrow(monkeypatch):
    """``narrow(on)``: compiled kernels on or off; returns the count of narrow-kernel calls."""
    monkeypatch.setattr(kernels, "VNNI8", False)  # this kernel, not its VNNI form (tests/numerics/test_vnni8.py)
    return spied_kernels(monkeypatch, {"narrow_rows": "narrow"})


def _both(narrow, x, w, cfg, seed, **kw):
    outs = []
    for on in (True, False):
        narrow(on)
        stats = ProductStats()
        y, _ = analog_product(x, w, cfg, generator=torch.Generator().manual_seed(seed), stats=stats, **kw)
        outs.append((y, stats.saturated, stats.conversions))
    return outs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=narrow_configs, std=st.sampled_from([0.0, 0.3, 1.0, 3.0]), B=st.integers(1, 3), M=st.integers(1, 40),
       N=st.integers(1, 600), K=st.integers(1, 120), shared_w=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_narrow_kernel_equals_the_torch_path(narrow, cfg, std, B, M, N, K, shared_w, seed):
    """Shapes across the kernel's row and column blocks (16 x 256), batched and shared weights."""
    cfg = cfg.replace(noise_std=std)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, K, generator=g) * 3
    w = torch.randn(1 if shared_w else B, N, K, generator=g)
    before = narrow(True)["narrow"]
    (a, sa, ca), (b, sb, cb) = _both(narrow, x, w, cfg, seed)
    assert torch.equal(a, b)
    assert (sa, ca) == (sb, cb)
    # the narrow kernel runs wherever the compiled kernels can (narrow float32 ADC arithmetic)
    ran = narrow(True)["narrow"] > before
    assert ran == kernels.use_fused(cfg, AdcPlan.for_config(cfg), torch.device("cpu"))


def test_saturating_noisy_layer_counts_agree(narrow):
    """A gain that saturates many samples, with noise: the same outputs and clipped count."""
    cfg = ABFPConfig(tile_width=8, gain=16.0, noise_std=1.0)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 70, 200, generator=g), torch.randn(1, 300, 200, generator=g)
    (a, sa, ca), (b, sb, cb) = _both(narrow, x, w, cfg, 7)
    assert torch.equal(a, b) and (sa, ca) == (sb, cb)
    assert 0 < sa < ca


@pytest.mark.parametrize("budget", [1 << 10, 1 << 14, 1 << 19])
def test_narrow_chunks_agree(monkeypatch, budget):
    cfg = ABFPConfig(tile_width=8, gain=2.0, noise_std=1.0)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 50, 96, generator=g), torch.randn(1, 270, 96, generator=g)
    ref, _ = analog_product(x, w, cfg, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", budget)
    AF.clear_cache()
    y, _ = analog_product(x, w, cfg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ref, y)


def test_wide_tiles_do_not_take_the_narrow_kernel(narrow):
    calls = narrow(True)
    g = torch.Generator().manual_seed(0)
    analog_product(torch.randn(1, 4, 64, generator=g), torch.randn(1, 8, 64, generator=g), ABFPConfig(tile_width=32))
    assert calls["narrow"] == 0
