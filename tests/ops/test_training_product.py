"""The forward of a product with gradients (``ops.device.training_product``) equals the one-pass
forward with the ADC mask: the same output and the same straight-through gradients, whether
samples clip or not, with and without noise (the same key), and on the torch fallback."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abfp import ABFPConfig
from abfp.numerics import ProductStats, analog_product
from abfp.ops.device import AnalogProduct, dequantised, ste_grads, training_product


def _operands(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 9, 70, generator=g), torch.randn(1, 5, 70, generator=g)


@pytest.mark.parametrize("gain, clips", [(1.0, False), (64.0, True)])
@pytest.mark.parametrize("noise", [0.0, 0.5])
@pytest.mark.parametrize("kernel", ["auto", "chunked"])
def test_two_pass_forward_equals_the_masked_forward(gain, clips, noise, kernel):
    cfg = ABFPConfig(tile_width=32, gain=gain, noise_std=noise, kernel=kernel)
    x3, w3 = _operands(1)
    key = 987654321
    y1, mask1 = analog_product(x3, w3, cfg, want_mask=True, key=key)
    stats = ProductStats()
    y2, mask2 = training_product(x3, w3, cfg, key=key, stats=stats)
    assert torch.equal(y1, y2)
    assert (stats.saturated > 0) == clips == (not bool(mask1.all()))
    assert stats.conversions == mask1.numel() and stats.saturated == int((~mask1).sum())
    if clips:
        assert torch.equal(mask1, mask2)
    else:
        assert mask2 is None
    gy = torch.randn_like(y1)
    g1 = ste_grads(gy, x3, w3, mask1, cfg, None, None, True, True)
    g2 = ste_grads(gy, x3, w3, mask2, cfg, None, None, True, True)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_the_autograd_function_draws_one_key_as_before():
    """Noise from torch's global generator: the product consumes exactly one draw (the key), so
    the generator's state afterwards is what the one-pass forward leaves."""
    cfg = ABFPConfig(tile_width=32, gain=64.0, noise_std=0.5)
    x3, w3 = _operands(2)
    torch.manual_seed(5)
    y1, _ = analog_product(x3, w3, cfg, want_mask=True)
    after1 = torch.rand(1)
    torch.manual_seed(5)
    y2 = AnalogProduct.apply(x3.requires_grad_(), w3, cfg, None, None, None, None, None)
    after2 = torch.rand(1)
    assert torch.equal(y1, y2.detach()) and torch.equal(after1, after2)


def test_dequantised_without_padding_equals_the_padded_values():
    """One tile holds the reduction (K <= n): the dequantised values are those of the padded
    tile, without its zero columns."""
    v3 = torch.randn(3, 4, 20)
    cfg = ABFPConfig(tile_width=32)
    q, mask = dequantised(v3, cfg, None, cfg.input_max_code)
    assert q.shape == (3, 4, 1, 20) and mask is None
    s = v3.abs().amax(-1, keepdim=True).to(torch.bfloat16).float()
    expect = torch.round(torch.clamp(v3 / s, -1, 1) * cfg.input_max_code) * (s / cfg.input_max_code)
    assert torch.equal(q.reshape(3, 4, 20), expect)


@pytest.mark.parametrize("mode", ["abfp", "fixed"])
@pytest.mark.parametrize("k", [20, 64, 70])
def test_unpadded_backward_equals_the_padded_tiles(mode, k):
    """The no-clip backward dequantises rows without padding; the GEMMs on the padded tiles
    (sliced back to K) give the same gradients, bit for bit."""
    cfg = ABFPConfig(tile_width=32, mode=mode, noise_std=0.0)
    g = torch.Generator().manual_seed(k)
    x3, w3 = torch.randn(2, 9, k, generator=g), torch.randn(1, 5, k, generator=g)
    x3[0, 0, :] = 0.0  # a block of zeros (scale 0)
    scales = (1.5, 2.0) if mode == "fixed" else (None, None)
    gy = torch.randn(2, 9, 5, generator=g)
    gx, gw = ste_grads(gy, x3, w3, None, cfg, *scales, True, True)
    xq, mx = dequantised(x3, cfg, scales[0], cfg.input_max_code)
    wq, mw = dequantised(w3, cfg, scales[1], cfg.weight_max_code)
    xf, wf = xq.reshape(2, 9, -1)[..., :k], wq.reshape(1, 5, -1)[..., :k]
    ex, ew = torch.matmul(gy, wf), torch.matmul(gy.transpose(1, 2), xf).sum(0, keepdim=True)
    if mode == "fixed":
        ex, ew = ex * mx, ew * mw
    assert torch.equal(gx, ex) and torch.equal(gw, ew)


def _device_configs():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "numerics"))
    from device_strategies import device_configs

    return device_configs(max_dac_bits=8, noise=(0.0, 0.5, 2.0), gains=(4.0, 16.0, 64.0, 256.0),
                          tile_widths=(3, 8, 16, 32, 128))


@settings(max_examples=40, deadline=None)
@given(cfg=_device_configs(), b=st.integers(1, 3), m=st.sampled_from([1, 7, 40, 700]), k=st.integers(1, 300),
       n_out=st.integers(1, 40), shared=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_compiled_kernels_mark_the_torch_paths_mask(cfg, b, m, k, n_out, shared, seed):
    """The straight-through mask the compiled rows kernels (epilogue_rows, narrow_rows; int8 tile
    products where they run) mark as they count is the torch path's (the compiled kernels off),
    sample for sample, and the output is the same, whether or not a sample clips."""
    import abfp.functional as AF
    from abfp.numerics import fused

    g = torch.Generator().manual_seed(seed)
    x3, w3 = torch.randn(b, m, k, generator=g), torch.randn(1 if shared else b, n_out, k, generator=g)
    static = 3.0 if cfg.mode == "fixed" else None
    runs = []
    for compiled in (True, False):
        saved = fused.AVAILABLE
        fused.AVAILABLE = compiled and saved
        AF.clear_cache()
        try:
            stats = ProductStats()
            y, mask = analog_product(x3, w3, cfg, input_scale=static, want_mask=True, key=4242, stats=stats)
        finally:
            fused.AVAILABLE = saved
            AF.clear_cache()
        runs.append((y, mask, stats.saturated))
    (y1, m1, s1), (y2, m2, s2) = runs
    assert torch.equal(m1, m2) and s1 == s2 == int((~m1).sum())
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_gradient_checkpointing_recomputes_a_converted_layer(noise):
    """``torch.utils.checkpoint(..., use_reentrant=False)`` (torch's recommended form, what
    transformers' gradient checkpointing uses) raised CheckpointError: the weight's NaN check
    recorded an autograd node in the forward, which the recomputation (weight cache hit) skipped."""
    import abfp
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, ck: bool) -> None:
            super().__init__()
            self.a, self.b, self.ck = nn.Linear(40, 16), nn.Linear(16, 3), ck

        def forward(self, x):
            return self.b(torch.relu(checkpoint(self.a, x, use_reentrant=False) if self.ck else self.a(x)))

    torch.manual_seed(0)
    plain, ck = Net(False), Net(True)
    ck.load_state_dict(plain.state_dict())
    cfg = ABFPConfig(tile_width=8, noise_std=noise)
    x = torch.randn(6, 40)
    grads = []
    for net in (plain, ck):
        m = abfp.convert(net, cfg)
        torch.manual_seed(1)  # unseeded noise comes from torch's generator, which checkpoint restores
        m(x).sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


@pytest.mark.parametrize("layer, shape", [("linear", (4, 8)), ("conv", (2, 3, 6, 6))])
def test_differentiating_a_device_gradient_again_is_refused(layer, shape):
    """A gradient penalty (``autograd.grad(..., create_graph=True)`` then ``backward``) treated the
    straight-through gradients as constants: the first layer's parameter gradient 98 % off, the
    others missing, silently. First-order gradients with ``create_graph=True`` still work."""
    import abfp
    from torch import nn

    torch.manual_seed(0)
    first = nn.Linear(8, 16) if layer == "linear" else nn.Conv2d(3, 4, 3)
    net = nn.Sequential(first, nn.Tanh(), nn.Flatten(), nn.LazyLinear(1))
    x = torch.randn(*shape)
    net(x)  # materialise the lazy layer
    m = abfp.convert(net, ABFPConfig(tile_width=8, noise_std=0.0))
    xx = x.clone().requires_grad_()
    g, = torch.autograd.grad(m(xx).sum(), xx, create_graph=True)
    xr = x.clone().requires_grad_()
    g_ref, = torch.autograd.grad(m(xr).sum(), xr)
    assert torch.equal(g.detach(), g_ref)  # the first-order gradient is the straight-through one
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        (g.norm() - 1).pow(2).backward()
