"""A convolution with gradients (QAT) on the column path (``ops.conv._conv2d_train``).

- its forward is the inference convolution (``torch.no_grad``) bit for bit, noise included,
  also where an ADC sample clips (then its gradients are those of one masked row product);
- with its reference input gradient (``TORCH_INPUT_GRAD = False``: GEMMs and col2im), its
  gradients (input, weight, bias) are those autograd computes through the row path
  (``_conv2d_rows``, the reference: ``TRAIN_IN_COLUMNS = False``) bit for bit, signs of zero
  and the input gradient's strides included, whenever no ADC sample clips or the batch is one
  im2col chunk; the outputs are the row path's (up to the sign of a zero) where it draws one key
  (one chunk, or no noise);
- with torch's convolution input gradient (``TORCH_INPUT_GRAD = True``, the default) the output
  and the weight and bias gradients are the reference's bit for bit, and the input gradient is
  within float32 summation error of a float64 ``fold(dY_rows @ Wq)`` (SPEC section 4), as is
  the reference's, where no sample clips;
- where one clips, the forward's kernels mark the clipped samples (the row product's mask), the
  convolution runs once, and the gradients are the masked row product's: bit for bit with the
  reference input gradient, within float32 summation error with torch's;
- the col2im of the backward equals autograd's sum of the offsets' slices bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import abfp.functional as AF
import abfp.ops.conv as conv_family
from abfp import ABFPConfig
from abfp.numerics import ProductStats, fused
from abfp.numerics.col2im import col2im, col2im_reference

sys.path.insert(0, str(Path(__file__).parents[1] / "numerics"))
from device_strategies import device_configs  # noqa: E402

pytestmark = pytest.mark.skipif(not fused.usable(), reason="the column training path needs the compiled kernels")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """The strides of the dimensions longer than 1 (a size-1 dimension's stride is arbitrary)."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def _step(monkeypatch, columns: bool, chunk_elements: int, torch_input_grad: bool = False) -> None:
    monkeypatch.setattr(conv_family, "TRAIN_IN_COLUMNS", columns)
    monkeypatch.setattr(conv_family, "_IM2COL_ELEMENTS", chunk_elements)
    monkeypatch.setattr(conv_family, "TORCH_INPUT_GRAD", torch_input_grad)


def _train(x, w, b, cfg, kw, key):
    """Output, its ADC statistics, the gradients of ``loss(relu(conv2d(relu(x) * 1.5)))`` (the
    layers around the convolution see its output's and its input gradient's memory layout, as
    batch norm or a bias sum would) and the gradient that reaches the convolution's input."""
    xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    bb = None if b is None else b.clone().requires_grad_(True)
    stats = ProductStats()
    xin = torch.relu(xx) * 1.5
    seen = []
    xin.register_hook(lambda g: seen.append(g.clone(memory_format=torch.preserve_format)))
    y = AF.conv2d(xin, ww, bb, **kw, config=cfg, key=key, cache=False, stats=stats)
    gout = torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape)
    gout[..., 0] = -0.0  # negative zeros in the incoming gradient
    (torch.relu(y) * gout + y * 0.25).sum().backward()
    return y.detach(), stats, xx.grad, ww.grad, None if bb is None else bb.grad, seen[0]


geometries = st.fixed_dictionaries({
    "batch": st.integers(1, 5),
    "groups": st.sampled_from([1, 1, 2]),
    "cin_per_group": st.integers(1, 5),
    "cout_per_group": st.integers(1, 6),
    "h": st.integers(3, 10),
    "w": st.integers(3, 10),
    "k": st.sampled_from([(1, 1), (2, 2), (3, 3), (3, 2)]),
    "stride": st.integers(1, 2),
    "padding": st.integers(0, 2),
    "dilation": st.integers(1, 2),
    "bias": st.booleans(),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geo=geometries, cfg=device_configs(max_dac_bits=8, noise=(0.0, 0.5, 2.0), bf16_io=True,
                                          tile_widths=(3, 8, 16, 32, 128)),
       chunk=st.sampled_from([1, 1 << 20]), seed=st.integers(0, 2**31 - 1))
def test_column_training_equals_inference_forward_and_row_path_gradients(monkeypatch, geo, cfg, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    G, (kh, kw_) = geo["groups"], geo["k"]
    x = torch.randn(geo["batch"], G * geo["cin_per_group"], geo["h"], geo["w"], generator=g)
    w = torch.randn(G * geo["cout_per_group"], geo["cin_per_group"], kh, kw_, generator=g)
    b = torch.randn(G * geo["cout_per_group"], generator=g) if geo["bias"] else None
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], groups=G)
    if geo["h"] + 2 * geo["padding"] < geo["dilation"] * (kh - 1) + 1 or geo["w"] + 2 * geo["padding"] < geo["dilation"] * (kw_ - 1) + 1:
        return
    key = 987654321
    _step(monkeypatch, True, chunk)
    cols = _train(x, w, b, cfg, kw, key)
    with torch.no_grad():
        inference = AF.conv2d(torch.relu(x) * 1.5, w, b, **kw, config=cfg, key=key, cache=False)
    _step(monkeypatch, False, chunk)
    rows = _train(x, w, b, cfg, kw, key)
    chunks = 1 if chunk > 1 else geo["batch"]  # an element budget of 1: one image per chunk
    assert _same_bits(cols[0], inference)
    assert _layout(cols[0]) == _layout(rows[0])  # the layers after it see the row path's memory layout
    # the row path restarts the noise of each chunk, and its zeros may carry another sign
    if cfg.noise_std > 0 and chunks > 1:
        return  # other outputs, so other gradients after the ReLU
    assert torch.equal(cols[0], rows[0]) and cols[1] == rows[1]
    if cols[1].saturated == 0 or chunks == 1:
        for a, r in zip(cols[2:], rows[2:]):
            assert _same_bits(a, r)
        assert _layout(cols[5]) == _layout(rows[5])


def _input_grad_float64(gy, w, cfg, geo, x_shape):
    """SPEC section 4's straight-through input gradient in float64, independently of the code under
    test: the patch gradients ``dY_rows @ Wq`` (``Wq``: the dequantised weights) folded back by
    ``F.fold`` onto the padded input, cropped. Also ``S``, the same sum of absolute terms (the
    scale of its float32 rounding error)."""
    from abfp.ops.device import dequantised_rows

    G, (kh, kw_), (pl, pr, pt, pb) = geo["groups"], geo["k"], geo["pads"]
    B, C, H, W = x_shape
    cout = w.shape[0]
    wq, _ = dequantised_rows(w.reshape(G, cout // G, -1), cfg, None, cfg.weight_max_code)  # (G, N/G, K)
    ho, wo = gy.shape[2], gy.shape[3]
    rows = gy.double().reshape(B, G, cout // G, ho * wo).transpose(2, 3)  # (B, G, L, N/G)
    out = []
    for term in (rows @ wq.double(), rows.abs() @ wq.double().abs()):  # (B, G, L, K)
        cols = term.permute(0, 1, 3, 2).reshape(B, C * kh * kw_, ho * wo)  # F.unfold's (c, i, j) order
        full = F.fold(cols, (H + pt + pb, W + pl + pr), (kh, kw_), dilation=geo["dilation"], stride=geo["stride"])
        out.append(full[:, :, pt : pt + H, pl : pl + W])
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geo=geometries, pads=st.sampled_from(["sym", "asym"]),
       cfg=device_configs(max_dac_bits=8, tile_widths=(3, 8, 32, 128)).map(lambda c: c.replace(mode="abfp")),
       seed=st.integers(0, 2**31 - 1))
def test_torch_input_gradient_is_the_reference_within_float32_summation_error(monkeypatch, geo, pads, cfg, seed):
    """The default input gradient (torch's convolution input gradient on ``Wq``) against the
    reference (GEMMs + col2im) and float64: each element of ``dX`` is a sum of ``n = N/G * kh * kw``
    products ``dY * Wq`` at most, which float32 rounds within ``gamma_(n+1) * S`` of the exact sum
    (``S``: the sum of their absolute values; ``gamma_m = m u / (1 - m u)``, ``u = 2^-24``) in any
    summation order; we allow ``n * 2^-23 * S`` per path (``>= gamma_(n+1)``), twice that between
    the two. Forward, weight and bias gradients: bit for bit the reference's."""
    g = torch.Generator().manual_seed(seed)
    G, (kh, kw_) = geo["groups"], geo["k"]
    d, p = geo["dilation"], geo["padding"]
    x = torch.randn(geo["batch"], G * geo["cin_per_group"], geo["h"], geo["w"], generator=g)
    w = torch.randn(G * geo["cout_per_group"], geo["cin_per_group"], kh, kw_, generator=g)
    b = torch.randn(G * geo["cout_per_group"], generator=g) if geo["bias"] else None
    if pads == "asym":  # 'same' padding of an even kernel: more on the right and bottom
        kw = dict(stride=1, padding="same", dilation=d, groups=G)
        th, tw = d * (kh - 1), d * (kw_ - 1)
        padlist = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        kw = dict(stride=geo["stride"], padding=p, dilation=d, groups=G)
        padlist = (p, p, p, p)
    if geo["h"] + padlist[2] + padlist[3] < d * (kh - 1) + 1 or geo["w"] + padlist[0] + padlist[1] < d * (kw_ - 1) + 1:
        return
    runs = []
    for fast in (True, False):
        _step(monkeypatch, True, 1 << 20, torch_input_grad=fast)
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        bb = None if b is None else b.clone().requires_grad_(True)
        stats = ProductStats()
        y = AF.conv2d(xx, ww, bb, **kw, config=cfg, key=11, cache=False, stats=stats)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
        y.backward(gy)
        runs.append((y.detach(), stats.saturated, xx.grad, ww.grad, None if bb is None else bb.grad, gy))
    fast, ref = runs
    assert _same_bits(fast[0], ref[0]) and fast[1] == ref[1] and _same_bits(fast[4], ref[4])
    if ref[1] > 0:
        return  # a clipped ADC sample: the masked gradients (their own test)
    assert _same_bits(fast[3], ref[3])
    n = (w.shape[0] // G) * kh * kw_
    exact, size = _input_grad_float64(ref[5], w, cfg, dict(geo, pads=padlist, stride=kw["stride"]), x.shape)
    bound = n * 2.0**-23 * size
    for got in (fast[2], ref[2]):
        assert got.shape == x.shape
        assert bool(((got.double() - exact).abs() <= bound).all())
    torch.testing.assert_close(fast[2], ref[2], rtol=0.0, atol=2 * float(bound.max()))


def test_a_clipped_sample_takes_the_masked_product_over_the_whole_batch(monkeypatch):
    """gain 64 clips: the forward is still the inference output (one product, one key), and
    the gradients are the ADC-masked ones of a single-chunk row path."""
    cfg = ABFPConfig(tile_width=32, gain=64.0, noise_std=0.5)
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(4, 6, 7, 7, generator=g), torch.randn(5, 6, 3, 3, generator=g)
    kw = dict(padding=1)
    _step(monkeypatch, True, 1)  # four chunks on the row path, by default
    cols = _train(x, w, None, cfg, kw, 17)
    assert cols[1].saturated > 0
    with torch.no_grad():
        assert _same_bits(cols[0], AF.conv2d(torch.relu(x) * 1.5, w, **kw, config=cfg, key=17, cache=False))
    _step(monkeypatch, False, 1 << 20)  # the row path in one chunk
    rows = _train(x, w, None, cfg, kw, 17)
    assert torch.equal(cols[0], rows[0]) and cols[1] == rows[1]
    for a, r in zip(cols[2:4], rows[2:4]):
        assert _same_bits(a, r)


def test_one_key_per_convolution(monkeypatch):
    """Noise from torch's global generator: the training convolution draws one key, as the
    inference one does, however many im2col chunks the batch would take."""
    cfg = ABFPConfig(noise_std=1.0)
    x, w = torch.randn(3, 4, 6, 6), torch.randn(5, 4, 3, 3)
    _step(monkeypatch, True, 1)
    torch.manual_seed(5)
    y = AF.conv2d(x.requires_grad_(), w, padding=1, config=cfg, cache=False)
    after = torch.rand(1)
    torch.manual_seed(5)
    with torch.no_grad():
        inference = AF.conv2d(x, w, padding=1, config=cfg, cache=False)
    assert torch.equal(y.detach(), inference) and torch.equal(torch.rand(1), after)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 5), ho=st.integers(1, 6), wo=st.integers(1, 6),
       k=st.sampled_from([(1, 1), (2, 3), (3, 3)]), stride=st.sampled_from([(1, 1), (2, 1), (2, 3)]),
       dilation=st.sampled_from([(1, 1), (2, 2)]), extra=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_col2im_equals_autograd_sum_of_slices(b, c, ho, wo, k, stride, dilation, extra, seed):
    """Against autograd itself (``torch.stack`` of the offsets' slices of a padded input, as
    ``_im2col`` builds them), and the compiled kernel against the torch one: the same bits,
    with ``-0.0`` and ``+0.0`` in the patch gradients."""
    hp = stride[0] * (ho - 1) + dilation[0] * (k[0] - 1) + 1 + extra
    wp = stride[1] * (wo - 1) + dilation[1] * (k[1] - 1) + 1 + extra
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(b, ho, wo, c, k[0] * k[1], generator=g)
    grads[torch.rand(grads.shape, generator=g) < 0.3] = -0.0
    grads[torch.rand(grads.shape, generator=g) < 0.1] = 0.0
    grads[:, :, :, 0] = -0.0  # a channel of negative zeros: -0.0 only where every offset reaches
    xpad = torch.randn(b, c, hp, wp, requires_grad=True)
    cols = conv_family._im2col(xpad, k[0], k[1], stride, dilation, ho, wo)
    cols.backward(grads)
    expect = xpad.grad.permute(0, 2, 3, 1)
    ref = col2im_reference(grads, (hp, wp), k, stride, dilation)
    assert _same_bits(ref, expect)
    assert _same_bits(col2im(grads, (hp, wp), k, stride, dilation), expect)


def test_row_path_chunks_under_an_explicit_key_draw_distinct_noise(monkeypatch):
    """The row path (the reference of the column path, and the path of float64 or GPU training)
    under an explicit noise key: each im2col chunk after the first runs under its own key
    (``chunk_key``), so chunks do not repeat the noise (image i and image i + step equal, as
    they were); the first chunk is the column path's product bit for bit."""
    _step(monkeypatch, columns=False, chunk_elements=2 * 4 * 5 * 5 * 9)  # two images per im2col chunk
    torch.manual_seed(3)
    cfg = ABFPConfig(tile_width=16, gain=2)
    x, w = torch.randn(6, 4, 7, 7), torch.randn(8, 4, 3, 3)
    xg = x.clone().requires_grad_(True)
    rows = AF.conv2d(xg, w, config=cfg, key=987).detach()
    noise = rows - AF.conv2d(xg, w, config=cfg.replace(noise_std=0.0), key=987).detach()
    assert noise.abs().max() > 0
    for a, b in [(0, 2), (0, 4), (2, 4), (1, 3)]:
        assert not torch.equal(noise[a], noise[b])
    with torch.no_grad():
        cols = AF.conv2d(x[:2], w, config=cfg, key=987)
    assert torch.equal(rows[:2], cols)
    keys = {conv_family.chunk_key(987, i) for i in range(0, 64, 2)}
    assert len(keys) == 32 and all(0 <= k < 2**63 for k in keys) and 987 not in keys


def _operands(geo: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Random input, weight and bias (where ``geo`` has one) of a geometry, ``None`` where its
    kernel does not fit the padded input."""
    g = torch.Generator().manual_seed(seed)
    G, (kh, kw_), p = geo["groups"], geo["k"], geo["padding"]
    if geo["h"] + 2 * p < geo["dilation"] * (kh - 1) + 1 or geo["w"] + 2 * p < geo["dilation"] * (kw_ - 1) + 1:
        return None
    x = torch.randn(geo["batch"], G * geo["cin_per_group"], geo["h"], geo["w"], generator=g)
    w = torch.randn(G * geo["cout_per_group"], geo["cin_per_group"], kh, kw_, generator=g)
    b = torch.randn(G * geo["cout_per_group"], generator=g) if geo["bias"] else None
    return x, w, b


def _unfold_rows(x: torch.Tensor, geo: dict, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """The row product's left operand, independently: ``F.unfold`` patches (G, B*Ho*Wo, K)."""
    G, (kh, kw_) = geo["groups"], geo["k"]
    cols = F.unfold(F.pad(x, pads), (kh, kw_), dilation=geo["dilation"], stride=geo["stride"])  # (B, C*kh*kw, L)
    B, L = x.shape[0], cols.shape[2]
    return cols.reshape(B, G, -1, L).permute(1, 0, 3, 2).reshape(G, B * L, -1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geo=geometries, cfg=device_configs(max_dac_bits=8, noise=(0.0, 0.5, 2.0), gains=(4.0, 16.0, 64.0, 256.0),
                                          tile_widths=(3, 8, 16, 32, 128)),
       direct=st.booleans(), narrow=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_forward_kernels_mark_the_clipped_samples_of_the_row_product(monkeypatch, geo, cfg, direct, narrow, seed):
    """The clamp mask the column forward's kernels fill (grouped_direct, narrow_cols8,
    epilogue_cols4, epilogue_cols, or the torch column path) is the row product's
    (``analog_product(want_mask=True)`` on ``F.unfold`` patches, the same key), sample for sample."""
    from abfp.numerics import analog_product, encode_weights
    from abfp.numerics import conv as nconv

    monkeypatch.setattr(nconv, "DIRECT_GROUPED", direct)
    monkeypatch.setattr(nconv, "NARROW8", narrow)
    G, (kh, kw_), p = geo["groups"], geo["k"], geo["padding"]
    operands = _operands(geo, seed)
    if operands is None:
        return
    x, w, _ = operands
    w3 = w.reshape(G, geo["cout_per_group"], -1)
    pads = (p, p, p, p)
    ho = (geo["h"] + 2 * p - geo["dilation"] * (kh - 1) - 1) // geo["stride"] + 1
    wo = (geo["w"] + 2 * p - geo["dilation"] * (kw_ - 1) - 1) // geo["stride"] + 1
    static = x.abs().max() if cfg.mode == "fixed" else None
    weights = encode_weights(w3, cfg, None)
    stats = ProductStats()
    inside = torch.ones(G, weights.codes.shape[1], geo["batch"] * ho * wo, geo["cout_per_group"], dtype=torch.bool)
    y = conv_family._conv2d_cols(x, pads, weights, cfg, G, (kh, kw_), (geo["stride"],) * 2, (geo["dilation"],) * 2,
                                 (ho, wo), static, None, stats, channels_last=False, key=4321, inside=inside)
    yr, mask = analog_product(_unfold_rows(x, geo, pads), w3, cfg, input_scale=static, want_mask=True, key=4321)
    assert int((~inside).sum()) == stats.saturated
    assert torch.equal(inside, mask)
    with torch.no_grad():  # the mask changes nothing of the output
        plain = conv_family._conv2d_cols(x, pads, weights, cfg, G, (kh, kw_), (geo["stride"],) * 2,
                                         (geo["dilation"],) * 2, (ho, wo), static, None, None, channels_last=False,
                                         key=4321)
    assert _same_bits(y, plain)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geo=geometries, cfg=device_configs(max_dac_bits=8, noise=(0.0, 0.5), gains=(4.0, 16.0, 64.0, 256.0),
                                          tile_widths=(3, 8, 16, 32, 128)),
       terms=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_clipped_samples_give_the_masked_row_gradients_without_running_again(monkeypatch, geo, cfg, terms, seed):
    """Gains that clip: the column path runs each convolution once (its forward's kernels mark
    the clipped samples), and its gradients are those of the masked row product over the whole
    batch (the reference: ``TRAIN_IN_COLUMNS = False``, one im2col chunk): with the reference
    input gradient bit for bit; with torch's (the default, ABFP mode) and the clipped samples'
    terms subtracted (``terms``: :data:`CLIPPED_TERMS_SHARE` unbounded, else 0: the masked product
    again) within float32 summation error, bounded by float64 sums of absolute terms."""
    G, (kh, kw_), p = geo["groups"], geo["k"], geo["padding"]
    operands = _operands(geo, seed)
    if operands is None:
        return
    x, w, b = operands
    kw = dict(stride=geo["stride"], padding=p, dilation=geo["dilation"], groups=G)
    reruns = []
    real_rows = conv_family._conv2d_rows
    monkeypatch.setattr(conv_family, "_conv2d_rows", lambda *a, **k: reruns.append(1) or real_rows(*a, **k))
    monkeypatch.setattr(conv_family, "CLIPPED_TERMS_SHARE", float("inf") if terms else 0.0)
    _step(monkeypatch, True, 1, torch_input_grad=False)
    ref_cols = _train(x, w, b, cfg, kw, 99)
    _step(monkeypatch, True, 1, torch_input_grad=True)
    fast = _train(x, w, b, cfg, kw, 99)
    assert not reruns  # nothing ran twice
    _step(monkeypatch, False, 1 << 20)  # the row path in one chunk: the masked product's autograd
    rows = _train(x, w, b, cfg, kw, 99)
    assert torch.equal(ref_cols[0], rows[0]) and ref_cols[1] == rows[1] == fast[1]
    assert _same_bits(fast[0], ref_cols[0])  # (zeros' signs: the column path's)
    if rows[1].saturated == 0:
        return  # nothing clipped: the im2col chunks of the columns' gradients (the first test)
    for a, r in zip(ref_cols[2:], rows[2:]):
        assert _same_bits(a, r)
    assert _same_bits(fast[4], rows[4])
    if cfg.mode == "fixed":
        for a, r in zip(fast[2:], ref_cols[2:]):  # the reference path itself
            assert _same_bits(a, r)
        return
    # float32 summation error: every gradient element is a sum of float32 products; both paths
    # round within m 2^-23 S of the exact sum (m terms, S their absolute sum, here bounded above)
    from abfp.ops.device import dequantised_rows

    pads = (p, p, p, p)
    gy_abs = torch.linspace(-1.0, 1.0, rows[0].numel()).reshape(rows[0].shape).abs() + 0.25  # >= |dL/dy|
    ng, cout = geo["cout_per_group"], w.shape[0]
    wq, _ = dequantised_rows(w.reshape(G, ng, -1), cfg, None, cfg.weight_max_code)
    xin = torch.relu(x) * 1.5
    xq, _ = dequantised_rows(_unfold_rows(xin, geo, pads), cfg, None, cfg.input_max_code)  # (G, M, K)
    ho, wo = rows[0].shape[2], rows[0].shape[3]
    gyr = gy_abs.double().reshape(x.shape[0], G, ng, ho * wo).permute(1, 0, 3, 2).reshape(G, -1, ng)  # (G, M, Ng)
    size_w = gyr.transpose(1, 2) @ xq.double().abs()  # (G, Ng, K)
    m_w = gyr.shape[1]
    tol_w = 3 * (m_w + 2) * 2.0**-23 * size_w.reshape(w.shape)
    assert bool(((fast[3].double() - rows[3].double()).abs() <= tol_w).all())
    patch = gyr @ wq.double().abs()  # (G, M, K)
    cols = patch.reshape(G, x.shape[0], ho * wo, -1).permute(1, 0, 3, 2).reshape(x.shape[0], -1, ho * wo)
    size_x = F.fold(cols, (geo["h"] + 2 * p, geo["w"] + 2 * p), (kh, kw_), dilation=geo["dilation"],
                    stride=geo["stride"])[:, :, p : p + geo["h"], p : p + geo["w"]]
    m_x = ng * kh * kw_
    tol_x = 3 * (m_x + 2) * 2.0**-23 * size_x
    assert bool(((fast[5].double() - rows[5].double()).abs() <= tol_x).all())
