"""Conv3d and transposed convolutions on the device (SPEC 3.1) against an independent float64
evaluation: im2col in ``unfold`` order for conv3d, one product per input position and an
explicit scatter (overlap-add) for the transposed convolutions; the device product itself
is :func:`abfp.numerics.reference_product` (SPEC section 1 in float64)."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import abfp
import abfp.functional as AF
from abfp import ABFPConfig
from abfp.noise.product import ProductView
from abfp.numerics import reference_product

QUIET = ABFPConfig(noise_std=0.0)
LOW = ABFPConfig(tile_width=8, input_bits=4, weight_bits=4, output_bits=4, gain=2.0, noise_std=0.0)
HIGH = ABFPConfig(input_bits=16, weight_bits=16, output_bits=24, gain=1.0, noise_std=0.0, scale_dtype="float32")
KERNELS = ("auto", "chunked", "reference")
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    phases=[Phase.explicit, Phase.generate])  # no shrinking: a failure reports its example as drawn


# --------------------------------------------------------------------------- float64 oracle
def _fixed_scales(x, w, cfg):
    """Fixed point (SPEC 2): one static scale per tensor, the whole input and the whole weight
    (not one per group)."""
    if cfg.mode != "fixed":
        return {}
    return dict(input_scale=float(x.abs().max()), weight_scale=float(w.abs().max()))


def _ref_conv3d(x, w, stride, pads, dilation, groups, cfg, channels_last_order=False):
    """im2col in float64, reduction in unfold order (c, i, j, l) (or (i, j, l, c) with
    ``channels_last_order``); per group reference_product. Returns y (B, Cout, Do, Ho, Wo),
    sum of |tile outputs| and one ADC code, both per output."""
    x = x.double()
    B, C = x.shape[:2]
    cout, cg = w.shape[:2]
    k = w.shape[2:]
    xp = F.pad(x, [v for lo_hi in reversed(pads) for v in lo_hi])
    out = [(xp.shape[2 + a] - dilation[a] * (k[a] - 1) - 1) // stride[a] + 1 for a in range(3)]
    cols = torch.empty(B, *out, C, *k, dtype=torch.float64)
    for i, j, l in itertools.product(*(range(v) for v in k)):
        s0, s1, s2 = (i * dilation[0], j * dilation[1], l * dilation[2])
        v = xp[:, :, s0 : s0 + stride[0] * (out[0] - 1) + 1 : stride[0],
               s1 : s1 + stride[1] * (out[1] - 1) + 1 : stride[1], s2 : s2 + stride[2] * (out[2] - 1) + 1 : stride[2]]
        cols[..., i, j, l] = v.permute(0, 2, 3, 4, 1)
    cols = cols.reshape(-1, groups, cg, *k)
    wg = w.double().reshape(groups, cout // groups, cg, *k)
    if channels_last_order:
        cols, wg = cols.permute(0, 1, 3, 4, 5, 2), wg.permute(0, 1, 3, 4, 5, 2)
    cols = cols.reshape(-1, groups, cg * math.prod(k))
    wg = wg.reshape(groups, cout // groups, -1)
    ys, tiles, codes = [], [], []
    for g in range(groups):
        r = reference_product(cols[:, g], wg[g], cfg, **_fixed_scales(x, w, cfg))
        ys.append(r.y[0])
        tiles.append(r.tile_outputs[0].abs().sum(-1))
        code = r.sx[0].unsqueeze(1) * r.sw[0].unsqueeze(0) * (cfg.tile_width / (cfg.gain * cfg.output_max_code))
        codes.append(code.amax(-1) if code.shape[-1] else torch.zeros_like(r.y[0]))

    def shape(t):
        return torch.cat(t, 1).reshape(B, *out, cout).permute(0, 4, 1, 2, 3)

    return shape(ys), shape(tiles), shape(codes)


def _scatter_index(sp_in, k, s, p, d, sp_out):
    """For every (input position, kernel tap), the flat output position it lands on, or -1."""
    idx = []
    for pos in itertools.product(*(range(v) for v in sp_in)):
        for kk in itertools.product(*(range(v) for v in k)):
            q = [pos[a] * s[a] + kk[a] * d[a] - p[a] for a in range(len(sp_in))]
            inside = all(0 <= q[a] < sp_out[a] for a in range(len(q)))
            idx.append(int(torch.tensor(q) @ torch.tensor([math.prod(sp_out[a + 1:]) for a in range(len(q))]))
                       if inside else -1)
    return torch.tensor(idx)


def _ref_conv_t(x, w, s, p, op, d, groups, cfg):
    """Per group, one reference product per input position, P[(b, p), (o, k)] = x[b, :, p] . W[:, o, k];
    then an explicit float64 scatter of every (p, k) to q = p s + k d - pad."""
    x = x.double()
    B, cin = x.shape[:2]
    sp_in, k = tuple(x.shape[2:]), tuple(w.shape[2:])
    nd = len(sp_in)
    cg, cout_g = cin // groups, w.shape[1]
    sp_out = tuple((sp_in[a] - 1) * s[a] - 2 * p[a] + d[a] * (k[a] - 1) + op[a] + 1 for a in range(nd))
    idx = _scatter_index(sp_in, k, s, p, d, sp_out)
    keep = idx >= 0
    outs = [torch.zeros(B, groups * cout_g, math.prod(sp_out), dtype=torch.float64) for _ in range(3)]
    for g in range(groups):
        rows = x[:, g * cg : (g + 1) * cg].reshape(B, cg, -1).transpose(1, 2).reshape(-1, cg)  # (B*L, Cg)
        wg = w[g * cg : (g + 1) * cg].double().reshape(cg, -1).T  # (Cout_g * kvol, Cg)
        r = reference_product(rows, wg, cfg, **_fixed_scales(x, w, cfg))
        code = r.sx[0].unsqueeze(1) * r.sw[0].unsqueeze(0) * (cfg.tile_width / (cfg.gain * cfg.output_max_code))
        parts = (r.y[0], r.tile_outputs[0].abs().sum(-1), code.amax(-1) if code.shape[-1] else 0 * r.y[0])
        for out, v in zip(outs, parts):
            # (B, L, Cout_g, kvol) -> (B, Cout_g, L*kvol) in the order of idx (position-major)
            v = v.reshape(B, -1, cout_g, math.prod(k)).permute(0, 2, 1, 3).reshape(B, cout_g, -1)
            out[:, g * cout_g : (g + 1) * cout_g].index_add_(2, idx[keep], v[:, :, keep])
    return tuple(o.reshape(B, groups * cout_g, *sp_out) for o in outs)


def _assert_agrees(y, ref, tile_abs, one_code, bias=None):
    """Equal to float32 rounding, except rare outputs one ADC code of one tile off (SPEC 1)."""
    ref = ref + (0 if bias is None else bias.double().view(1, -1, *([1] * (ref.dim() - 2))))
    diff = (y.double() - ref).abs()
    tol = 2e-6 * (tile_abs + ref.abs()) + 1e-30
    bad = diff > tol
    assert bool((diff[bad] <= one_code[bad] * 1.001 + tol[bad]).all()), f"max diff {diff.max():.3g}"
    assert int(bad.sum()) <= max(2, 0.01 * diff.numel()), f"{int(bad.sum())} of {diff.numel()} outputs one code off"


def _data(shape, g, sparse=False):
    v = torch.randn(shape, generator=g)
    return v * (torch.rand(shape, generator=g) < 0.3) if sparse else v


cfgs = st.builds(ABFPConfig, tile_width=st.sampled_from([3, 5, 8, 16, 128]), input_bits=st.integers(3, 8),
                 weight_bits=st.integers(3, 8), output_bits=st.integers(4, 10), gain=st.sampled_from([1.0, 2.0, 8.0]),
                 noise_std=st.just(0.0), mode=st.sampled_from(["abfp", "abfp", "fixed"]))


# --------------------------------------------------------------------------- conv3d
@SETTINGS
@given(cfg=cfgs, seed=st.integers(0, 2**31 - 1), groups=st.sampled_from([1, 2, 3]), cg=st.integers(1, 3),
       og=st.integers(1, 3), k=st.tuples(*[st.integers(1, 3)] * 3), s=st.tuples(*[st.integers(1, 3)] * 3),
       d=st.tuples(*[st.integers(1, 2)] * 3), p=st.sampled_from(["same", "valid", 0, 1, (2, 0, 1)]),
       kernel=st.sampled_from(KERNELS), sparse=st.booleans(), bias=st.booleans())
def test_conv3d_matches_float64_im2col(cfg, seed, groups, cg, og, k, s, d, p, kernel, sparse, bias):
    if p == "same":
        s = (1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    x = _data((2, cg * groups, 5, 6, 4), g, sparse) * 2
    w = _data((og * groups, cg, *k), g, sparse)
    b = torch.randn(og * groups, generator=g) if bias else None
    if p == "same":
        tot = [dd * (kk - 1) for dd, kk in zip(d, k)]
        pads = [(t // 2, t - t // 2) for t in tot]
    elif p == "valid":
        pads = [(0, 0)] * 3
    else:
        pads = [(v, v) for v in ((p,) * 3 if isinstance(p, int) else p)]
    if any(5 + sum(pads[0]) < d[0] * (k[0] - 1) + 1 for _ in [0]) or 6 + sum(pads[1]) < d[1] * (k[1] - 1) + 1 \
            or 4 + sum(pads[2]) < d[2] * (k[2] - 1) + 1:
        with pytest.raises(ValueError, match="kernel is larger"):
            AF.conv3d(x, w, b, s, p, d, groups, config=cfg)
        return
    y = AF.conv3d(x, w, b, s, p, d, groups, config=cfg.replace(kernel=kernel))
    ref, tiles, code = _ref_conv3d(x, w, s, pads, d, groups, cfg)
    assert y.shape == F.conv3d(x, w, b, s, p, d, groups).shape and y.dtype == torch.float32
    _assert_agrees(y, ref, tiles, code, b)


def test_conv3d_reduction_order_is_unfold_order():
    """Tiles of 9 = k_h k_w elements at n = 9 with one huge channel: only the (c, i, j, l)
    order keeps the small channel's blocks apart (a channel-last order would share scales)."""
    cfg = ABFPConfig(tile_width=9, input_bits=4, weight_bits=8, output_bits=12, gain=1.0, noise_std=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 5, 5, generator=g)
    x[:, 0] *= 1000.0
    w = torch.randn(3, 2, 1, 3, 3, generator=g)
    ref, tiles, code = _ref_conv3d(x, w, (1, 1, 1), [(0, 0)] * 3, (1, 1, 1), 1, cfg)
    for kernel in KERNELS:
        _assert_agrees(AF.conv3d(x, w, config=cfg.replace(kernel=kernel)), ref, tiles, code)
    # the oracle tells the orders apart: with the reduction in (i, j, l, c) order each tile mixes
    # both channels and the small one is lost under the large one's scale
    wrong = _ref_conv3d(x, w, (1, 1, 1), [(0, 0)] * 3, (1, 1, 1), 1, cfg, channels_last_order=True)[0]
    assert (wrong - ref).abs().max() > 10 * code.max()  # many ADC codes apart: the test tells the orders apart


def test_conv3d_unbatched_channels_last_and_dtype():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 5, 7, generator=g)
    w = torch.randn(6, 4, 3, 3, 3, generator=g)
    y = AF.conv3d(x, w, padding=1, config=QUIET)
    torch.testing.assert_close(AF.conv3d(x[1], w, padding=1, config=QUIET), y[1], rtol=1e-6, atol=1e-6)
    ycl = AF.conv3d(x.contiguous(memory_format=torch.channels_last_3d), w, padding=1, config=QUIET)
    assert ycl.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(ycl, y, rtol=1e-6, atol=1e-6)
    assert AF.conv3d(x.to(torch.bfloat16), w.to(torch.bfloat16), config=QUIET).dtype == torch.bfloat16


# --------------------------------------------------------------------------- transposed
@SETTINGS
@given(cfg=cfgs, seed=st.integers(0, 2**31 - 1), nd=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]),
       cg=st.integers(1, 4), og=st.integers(1, 3), k=st.integers(1, 4), s=st.integers(1, 3), d=st.integers(1, 2),
       p=st.integers(0, 2), op=st.integers(0, 2), kernel=st.sampled_from(KERNELS), bias=st.booleans(),
       unbatched=st.booleans())
def test_conv_transpose_matches_float64_per_position_products(cfg, seed, nd, groups, cg, og, k, s, d, p, op, kernel,
                                                               bias, unbatched):
    g = torch.Generator().manual_seed(seed)
    sp = (4, 3, 3)[:nd]
    x = torch.randn(2, cg * groups, *sp, generator=g)
    w = torch.randn(cg * groups, og, *[k] * nd, generator=g)
    b = torch.randn(og * groups, generator=g) if bias else None
    ours = getattr(AF, f"conv_transpose{nd}d")
    theirs = getattr(F, f"conv_transpose{nd}d")
    out = [(v - 1) * s - 2 * p + d * (k - 1) + op + 1 for v in sp]
    if (op >= s and op >= d) or min(out) <= 0:
        with pytest.raises(ValueError, match=f"conv_transpose{nd}d"):
            ours(x, w, b, s, p, op, groups, d, config=cfg)
        return
    xin = x[0] if unbatched else x
    y = ours(xin, w, b, s, p, op, groups, d, config=cfg.replace(kernel=kernel))
    assert y.shape == theirs(xin, w, b, s, p, op, groups, d).shape
    ref, tiles, code = _ref_conv_t(x[:1] if unbatched else x, w, (s,) * nd, (p,) * nd, (op,) * nd, (d,) * nd, groups, cfg)
    if unbatched:
        y = y.unsqueeze(0)
    _assert_agrees(y, ref, tiles, code, b)


def test_conv_transpose_tuples_of_options_per_axis():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, 4, 2, generator=g)
    w = torch.randn(4, 3, 2, 3, 2, generator=g)
    opts = dict(stride=(2, 1, 3), padding=(1, 0, 1), output_padding=(1, 0, 2), dilation=(1, 2, 1))
    y = AF.conv_transpose3d(x, w, config=LOW, **opts)
    ref, tiles, code = _ref_conv_t(x, w, opts["stride"], opts["padding"], opts["output_padding"], opts["dilation"], 1, LOW)
    _assert_agrees(y, ref, tiles, code)
    assert y.shape == F.conv_transpose3d(x, w, **opts).shape


# --------------------------------------------------------------------------- paths, noise, gradients
@pytest.mark.parametrize("which", ["conv3d", "conv_transpose2d", "conv_transpose3d"])
def test_compiled_and_torch_paths_give_the_same_noisy_numbers(which):
    g = torch.Generator().manual_seed(3)
    if which == "conv3d":
        x, w = torch.randn(2, 6, 5, 6, 7, generator=g), torch.randn(8, 3, 3, 3, 2, generator=g)
        args, fn = dict(stride=(1, 2, 1), padding=1, groups=2), AF.conv3d
    elif which == "conv_transpose2d":
        x, w = torch.randn(3, 40, 5, 6, generator=g), torch.randn(40, 16, 4, 4, generator=g)
        args, fn = dict(stride=2, padding=1), AF.conv_transpose2d
    else:
        x, w = torch.randn(2, 8, 3, 4, 3, generator=g), torch.randn(8, 4, 2, 2, 2, generator=g)
        args, fn = dict(stride=2, groups=2), AF.conv_transpose3d
    noisy = ABFPConfig(tile_width=16, noise_std=1.0, seed=7)
    AF.reseed()  # seeded functional calls continue one stream per seed (abfp.noise_keys)
    ya = fn(x, w, config=noisy, **args)
    AF.reseed()
    yc = fn(x, w, config=noisy.replace(kernel="chunked"), **args)
    y0 = fn(x, w, config=noisy.replace(noise_std=0.0), **args)
    torch.testing.assert_close(ya, yc, rtol=1e-5, atol=1e-5)  # float32 summation order only
    assert not torch.allclose(ya, y0)  # the noise is there
    AF.reseed()
    torch.testing.assert_close(fn(x, w, config=noisy, **args), ya, rtol=0, atol=0)  # seeded: repeatable
    assert not torch.equal(fn(x, w, config=noisy, **args), ya)  # the stream goes on: a second call differs


@pytest.mark.parametrize("which", ["conv3d", "conv_transpose1d", "conv_transpose3d"])
def test_gradients_flow_straight_through(which):
    g = torch.Generator().manual_seed(4)
    if which == "conv3d":
        x, w = torch.randn(2, 4, 4, 5, 4, generator=g), torch.randn(6, 2, 2, 3, 2, generator=g)
        ours, theirs, args = AF.conv3d, F.conv3d, dict(padding=1, groups=2)
    elif which == "conv_transpose1d":
        x, w = torch.randn(2, 4, 7, generator=g), torch.randn(4, 3, 3, generator=g)
        ours, theirs, args = AF.conv_transpose1d, F.conv_transpose1d, dict(stride=2, output_padding=1)
    else:
        x, w = torch.randn(2, 4, 3, 3, 2, generator=g), torch.randn(4, 2, 2, 3, 2, generator=g)
        ours, theirs, args = AF.conv_transpose3d, F.conv_transpose3d, dict(stride=2, padding=1, groups=2)
    b = torch.randn(w.shape[0] if which == "conv3d" else w.shape[1] * args.get("groups", 1), generator=g)
    grads = []
    for f, kw in ((ours, dict(config=HIGH)), (theirs, {})):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = f(xs, ws, bs, **args, **kw)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        grads.append((xs.grad, ws.grad, bs.grad))
    for a, r in zip(*grads):
        assert a is not None
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3)  # 16-bit device: STE gradients ~ float32's


# --------------------------------------------------------------------------- cache, bad input
def test_weight_encodings_are_cached_per_weight_and_layout():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 6, 3, 3, generator=g)  # tied: a conv2d and a transposed conv2d share it
    w3 = torch.randn(4, 4, 3, 3, 3, generator=g)
    x = torch.randn(1, 6, 5, 5, generator=g)
    x3 = torch.randn(1, 4, 5, 5, 5, generator=g)
    from abfp.ops import conv_nd

    tc = conv_nd._TRANSPOSED_CACHE
    AF.clear_cache()
    t_misses, t_hits = tc.misses, tc.hits
    first = (AF.conv2d(x, w, config=LOW), AF.conv_transpose2d(x, w, config=LOW), AF.conv3d(x3, w3, config=LOW),
             AF.conv_transpose3d(x3, w3, config=LOW))
    misses, hits = AF.WEIGHT_CACHE.misses, AF.WEIGHT_CACHE.hits
    for _ in range(2):
        again = (AF.conv2d(x, w, config=LOW), AF.conv_transpose2d(x, w, config=LOW), AF.conv3d(x3, w3, config=LOW),
                 AF.conv_transpose3d(x3, w3, config=LOW))
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    assert AF.WEIGHT_CACHE.misses == misses  # conv_transpose's cache counts separately; conv3d shares
    assert tc.misses == t_misses + 2 and tc.hits == t_hits + 4
    assert AF.WEIGHT_CACHE.hits >= hits + 4
    ref, tiles, code = _ref_conv_t(x, w, (1, 1), (0, 0), (0, 0), (1, 1), 1, LOW)
    _assert_agrees(again[1], ref, tiles, code)  # the tied weight's transposed encoding is its own
    AF.clear_cache()  # clears the transposed layouts too
    AF.conv_transpose2d(x, w, config=LOW)
    assert tc.misses == t_misses + 3


def test_bad_input_is_refused_by_name():
    x, w = torch.randn(1, 4, 5, 5, 5), torch.randn(4, 2, 3, 3, 3)
    xb = x.clone()
    xb[0, 1, 2, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="input"):
        AF.conv3d(xb, torch.randn(2, 4, 3, 3, 3), config=QUIET)
    with pytest.raises(ValueError, match="input"):
        AF.conv_transpose3d(xb, w, config=QUIET)
    with pytest.raises(ValueError, match="channels"):
        AF.conv3d(x, torch.randn(2, 3, 3, 3, 3), config=QUIET)
    with pytest.raises(ValueError, match="channels"):
        AF.conv_transpose3d(x, torch.randn(3, 2, 3, 3, 3), config=QUIET)
    with pytest.raises(ValueError, match="output_padding"):
        AF.conv_transpose3d(x, w, stride=2, output_padding=2, config=QUIET)
    with pytest.raises(ValueError, match="padding"):
        AF.conv_transpose2d(x[0, :, 0], w[..., 0], padding="same", config=QUIET)
    with pytest.raises(ValueError, match="strided"):
        AF.conv3d(x, torch.randn(2, 4, 3, 3, 3), stride=2, padding="same", config=QUIET)
    with pytest.raises(TypeError, match="floating"):
        AF.conv_transpose1d(torch.ones(1, 4, 3, dtype=torch.int64), w[..., 0, 0], config=QUIET)


# --------------------------------------------------------------------------- converted models
class UNet3dBit(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv3d(2, 6, 3, stride=2, padding=1, padding_mode="replicate")
        self.mid = nn.Conv3d(6, 6, (3, 1, 3), padding="same", groups=3)
        self.up = nn.ConvTranspose3d(6, 4, 2, stride=2, output_padding=0)
        self.up2 = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, groups=1)
        self.up1 = nn.ConvTranspose1d(3, 2, 4, stride=3, groups=1, dilation=2)

    def forward(self, x):
        y = self.up(torch.relu(self.mid(torch.relu(self.down(x)))))  # (B, 4, 12, 12, 12)
        z = self.up2(y.mean(2))  # (B, 3, 24, 24)
        return self.up1(z.flatten(2)[..., :20])  # (B, 2, 63)


def _manual(m, x, cfg):
    y = AF.conv3d(F.pad(x, (1,) * 6, mode="replicate"), m.down.weight, m.down.bias, 2, 0, config=cfg)
    y = AF.conv3d(torch.relu(y), m.mid.weight, m.mid.bias, 1, "same", 1, 3, config=cfg)
    y = AF.conv_transpose3d(torch.relu(y), m.up.weight, m.up.bias, 2, config=cfg)
    z = AF.conv_transpose2d(y.mean(2), m.up2.weight, m.up2.bias, 2, 1, 1, config=cfg)
    return AF.conv_transpose1d(z.flatten(2)[..., :20], m.up1.weight, m.up1.bias, 3, 0, 0, 1, 2, config=cfg)


def test_converted_3d_and_transposed_layers_are_analog_and_silent():
    torch.manual_seed(0)
    m = UNet3dBit().eval()
    x = torch.randn(2, 2, 12, 12, 12)
    with torch.no_grad():
        yf = m(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "stays digital" warning
            conv = abfp.convert(m, LOW)
            ya = conv(x)
        ym = _manual(m, x, LOW)
    assert ya.shape == yf.shape
    assert (ya - yf).abs().max() > 1e-2 * yf.abs().max()  # 4-bit device: not the float32 numbers
    torch.testing.assert_close(ya, ym, rtol=0, atol=0)
    s = abfp.summary(conv, x)
    macs = {r.site.split(":")[0]: r.macs for r in s.rows}
    # independent counts: conv = outputs x C_in/g x kernel; transposed = input elements x C_out/g x kernel
    assert macs["down"] == 2 * 6 * 6**3 * 2 * 27
    assert macs["mid"] == 2 * 6 * 6**3 * 2 * 9
    assert macs["up"] == 2 * 6 * 6**3 * 4 * 8
    assert macs["up2"] == 2 * 4 * 12 * 12 * 3 * 9
    assert macs["up1"] == 2 * 3 * 20 * 2 * 4
    assert set(macs) == {"down", "mid", "up", "up2", "up1"}
    tiles = {r.site.split(":")[0]: r.tiles for r in s.rows}
    assert tiles["up"] == math.ceil(6 / 8) and tiles["down"] == math.ceil(54 / 8)
    from abfp.energy import account

    up = {c.site.split(":")[0]: c for c in account(conv, x).layers}["up"]
    # the device view of a transposed conv: rows = input positions, K = C_in/g, N = C_out/g * kernel
    assert (up.M, up.K, up.N, up.groups) == (2 * 6**3, 6, 4 * 8, 1)
    assert up.adc_conversions == 2 * 6**3 * 4 * 8 * 1 and up.dac_inputs == x.shape[0] * 6 * 6**3


def test_converted_transposed_model_trains_through_the_device():
    torch.manual_seed(1)
    m = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.ReLU())
    conv = abfp.convert(m, LOW)
    x = torch.randn(2, 3, 4, 4)
    y = conv(x)
    assert not torch.allclose(y, m(x), atol=1e-3)  # the forward pass is analog
    y.square().mean().backward()
    ws, bs = m[0].weight.detach().clone().requires_grad_(), m[0].bias.detach().clone().requires_grad_()
    torch.relu(AF.conv_transpose2d(x, ws, bs, 2, config=LOW)).square().mean().backward()
    torch.testing.assert_close(conv[0].weight.grad, ws.grad)  # the device's straight-through gradients
    torch.testing.assert_close(conv[0].bias.grad, bs.grad)


# --------------------------------------------------------------------------- noise ProductView
def _brute_view(x, w, s, p, op, d, groups):
    """Per output (b, o, q): ||x||^2 over the inputs landing there, D, and ||w_o||^2, in float64 loops."""
    x = x.double()
    B, cin = x.shape[:2]
    sp_in, k = tuple(x.shape[2:]), tuple(w.shape[2:])
    cg, cout_g = cin // groups, w.shape[1]
    sp_out = tuple((sp_in[a] - 1) * s[a] - 2 * p[a] + d[a] * (k[a] - 1) + op[a] + 1 for a in range(len(sp_in)))
    xn = torch.zeros(B, groups * cout_g, *sp_out, dtype=torch.float64)
    fan = torch.zeros(*sp_out, dtype=torch.float64)
    for pos in itertools.product(*(range(v) for v in sp_in)):
        for kk in itertools.product(*(range(v) for v in k)):
            q = tuple(pos[a] * s[a] + kk[a] * d[a] - p[a] for a in range(len(pos)))
            if all(0 <= q[a] < sp_out[a] for a in range(len(q))):
                fan[q] += cg
                for g in range(groups):
                    xn[(slice(None), slice(g * cout_g, (g + 1) * cout_g), *q)] += \
                        (x[(slice(None), slice(g * cg, (g + 1) * cg), *pos)] ** 2).sum(1, keepdim=True)
    wn = torch.stack([(w[g * cg : (g + 1) * cg, o].double() ** 2).sum() for g in range(groups) for o in range(cout_g)])
    return xn, fan.clamp_min(1), wn


@pytest.mark.parametrize("nd,groups,s,p,op,d", [(1, 1, 2, 1, 1, 1), (2, 2, 2, 0, 0, 2), (2, 1, 3, 2, 1, 1)])
def test_product_view_of_a_transposed_convolution(nd, groups, s, p, op, d):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 2 * groups, *[4] * nd, generator=g)
    w = torch.randn(2 * groups, 3, *[3] * nd, generator=g)
    b = torch.randn(3 * groups, generator=g)
    func = getattr(torch, f"conv_transpose{nd}d")
    from abfp.nn.mode import ProductCall

    call = ProductCall("m:conv0", "conv", LOW, (x, w), lambda: None, lambda: None,
                       (func, (x, w, b), dict(stride=s, padding=p, output_padding=op, groups=groups, dilation=d)))
    view = ProductView.from_call(call)
    assert view is not None and view.kind == "conv_transpose"
    y = view.compute()
    torch.testing.assert_close(y, func(x, w, b, s, p, op, groups, d))
    xn, fan, wn = _brute_view(x, w, (s,) * nd, (p,) * nd, (op,) * nd, (d,) * nd, groups)
    torch.testing.assert_close(torch.broadcast_to(view.input_norm_sq(), y.shape).double(), xn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.broadcast_to(view.fan_in(), y.shape)[0, 0].double(), fan)
    torch.testing.assert_close(torch.broadcast_to(view.weight_norm_sq(), y.shape[1:]).double(),
                               wn.view(-1, *[1] * nd).expand(y.shape[1:]), rtol=1e-5, atol=1e-5)
    assert view.channels == 3 * groups and view.reduction == 2 and view.output_channel_axis(y) == 1
    assert view.macs(y) == x.numel() * 3 * 3**nd
    e = torch.arange(1.0, 3 * groups + 1)
    ew = torch.broadcast_to(view.weight_channel(e), w.shape)
    for c in range(w.shape[0]):
        for o in range(3):
            assert float(ew[(c, o) + (0,) * nd]) == float(e[(c // 2) * 3 + o])


def test_product_view_of_conv3d_and_noise_injector_on_a_converted_model():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 4, 5, 3, generator=g)
    w = torch.randn(6, 2, 3, 2, 3, generator=g)
    from abfp.nn.mode import ProductCall

    call = ProductCall("m:conv0", "conv", LOW, (x, w), lambda: None, lambda: None,
                       (torch.conv3d, (x, w, None, 1, 1, 1, 2), {}))
    view = ProductView.from_call(call)
    y = view.compute()
    cols = F.pad(x, (1,) * 6).unfold(2, 3, 1).unfold(3, 2, 1).unfold(4, 3, 1)  # (1, C, Do, Ho, Wo, 3, 2, 3)
    xn = (cols.double() ** 2).reshape(1, 2, 2, *cols.shape[2:5], -1).sum((2, -1))  # per group
    torch.testing.assert_close(torch.broadcast_to(view.input_norm_sq(), y.shape).double(),
                               xn.repeat_interleave(3, 1), rtol=1e-5, atol=1e-5)
    assert view.macs(y) == y.numel() * 2 * 18 and view.reduction == 36
    from abfp.noise import NoiseInjector

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ConvTranspose3d(3, 2, 2, stride=2))
    conv = abfp.convert(m, QUIET)
    inj = NoiseInjector(conv, "shot")
    xin = torch.randn(2, 2, 4, 4, 4)
    prof = inj.profile([xin])
    kinds = {s.split(":")[0]: p.kind for s, p in prof.items()}
    assert kinds == {"0": "conv", "1": "conv_transpose"}
    macs = {s.split(":")[0]: p.macs for s, p in prof.items()}
    assert macs["1"] == 2 * 3 * 64 * 2 * 8 and macs["0"] == 2 * 3 * 64 * 2 * 27
    with torch.no_grad():
        y_noisy = conv(xin)
    assert y_noisy.shape == m(xin).shape and not torch.allclose(y_noisy, m(xin))


@pytest.mark.parametrize("cfg", [QUIET, HIGH, QUIET.replace(kernel="chunked"), QUIET.replace(kernel="reference")],
                         ids=["auto", "wide-adc", "chunked", "reference"])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_empty_batch_gives_torch_shape(cfg, nd):
    """A batch of 0 samples (the last, empty shard of a data set) gives torch's empty output,
    for every dimension, plain and transposed, on every kernel."""
    x = torch.randn(0, 4, *(6,) * nd)
    conv = {1: (AF.conv1d, F.conv1d), 2: (AF.conv2d, F.conv2d), 3: (AF.conv3d, F.conv3d)}[nd]
    convt = {1: (AF.conv_transpose1d, F.conv_transpose1d), 2: (AF.conv_transpose2d, F.conv_transpose2d),
             3: (AF.conv_transpose3d, F.conv_transpose3d)}[nd]
    w, wt = torch.randn(6, 2, *(3,) * nd), torch.randn(4, 3, *(3,) * nd)
    for (ours, theirs), weight, args in ((conv, w, dict(padding=1, groups=2)), (convt, wt, dict(stride=2))):
        y = ours(x, weight, config=cfg, **args)
        assert y.shape == theirs(x, weight, **args).shape and y.dtype == x.dtype
    m = abfp.convert(nn.Sequential(getattr(nn, f"Conv{nd}d")(4, 6, 3)), cfg)
    assert m(x).shape == (0, 6, *(4,) * nd)
