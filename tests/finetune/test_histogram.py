"""Histogram construction (100 bins, +0.5 per bin, normalised) and the noise sampler."""

from __future__ import annotations

import math

import pytest
import numpy as np
import torch

from abfp.finetune.hash32 import words
from abfp.finetune.histogram import Histogram, alias_arrays, slot_bits
from abfp.finetune import alias_kernel, avx2_lookup, avx512_block
from abfp.finetune.sampler import add_noise, noisy_eager

torch.set_num_threads(1)


def test_fit_counts_smoothing_and_normalisation() -> None:
    # 10 bins over [0, 10]: value j + 0.5 lands in bin j; bin j gets j samples (bin 0 none)
    values = torch.cat([torch.full((j,), j + 0.5) for j in range(10)] + [torch.tensor([0.0, 10.0])])
    h = Histogram.fit(values, bins=10, smoothing=0.5)
    counts = torch.tensor([float(j) for j in range(10)])
    counts[0] += 1  # the minimum 0.0
    counts[-1] += 1  # the maximum 10.0 belongs to the last bin
    expected = (counts + 0.5) / (counts.sum() + 10 * 0.5)
    assert h.bins == 10 and h.channels == 1
    torch.testing.assert_close(h.probs[0].double(), expected.double(), rtol=1e-6, atol=1e-7)
    assert float(h.probs.sum()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(h.edges[0], torch.arange(11, dtype=torch.float32))
    assert h.count == values.numel()


def test_default_is_100_bins_no_empty_bin() -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0)) ** 3  # long tails: many empty bins
    h = Histogram.fit(x)
    assert h.bins == 100
    assert bool((h.probs > 0).all())
    assert float(h.probs.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(h.probs.min()) == pytest.approx(0.5 / (5000 + 50), rel=1e-5)
    assert float(h.lo) == pytest.approx(float(x.min())) and float(h.edges[0, -1]) == pytest.approx(float(x.max()), rel=1e-5)
    assert h.std == pytest.approx(float(x.double().std()), rel=1e-9)


def test_per_channel_rows_and_constant_input() -> None:
    y = torch.zeros(8, 3, 4, 4)
    y[:, 1] = torch.linspace(-1, 1, 128).reshape(8, 4, 4)
    y[:, 2] = 5.0
    h = Histogram.fit(y, channel_dim=1)
    assert h.channels == 3 and h.channel_dim == 1
    assert float(h.width[0]) == 0.0 and float(h.width[2]) == 0.0
    assert float(h.lo[2]) == 5.0
    assert float(h.lo[1]) == -1.0 and float(h.width[1]) == pytest.approx(0.02)
    # a zero-width histogram draws its single value
    xi = add_noise(torch.zeros(8, 3, 4, 4), h, backend="eager")
    assert bool((xi[:, 2] == 5.0).all()) and bool((xi[:, 0] == 0.0).all())
    assert float(xi[:, 1].min()) >= -1.0 and float(xi[:, 1].max()) <= 1.0


def test_fit_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        Histogram.fit(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError):
        Histogram.fit(torch.zeros(0))
    with pytest.raises(ValueError):
        Histogram.fit(torch.ones(3), bins=0)


def test_alias_tables_reproduce_probabilities_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(4, 100, generator=g, dtype=torch.float64) ** 4
    probs[1, :50] = 0.0  # some zero bins
    probs[2] = 0.01  # uniform
    probs /= probs.sum(1, keepdim=True)
    q, alias = alias_arrays(probs)
    implied = q.clone()
    implied.scatter_add_(1, alias, 1.0 - q)
    torch.testing.assert_close(implied / 100, probs, rtol=0, atol=1e-12)
    q, alias = alias_arrays(probs, 128)  # padded to 128 slots: the 28 extra ones never kept
    assert bool((alias < 100).all()) and bool((q[:, 100:] == 0).all())
    implied = q.clone()
    implied.scatter_add_(1, alias, 1.0 - q)
    torch.testing.assert_close(implied[:, :100] / 128, probs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bins", [1, 2, 3, 7, 64, 100, 129])
def test_packed_tables_give_each_bin_its_probability_to_2_pow_minus_32(bins: int) -> None:
    """Each slot of the 32-bit words gives its threshold's share to its own bin and the rest to
    its alias: summed in integers, every bin's probability is within (slots pointing at it + 1)
    units of 2^-32 of p_j."""
    g = torch.Generator().manual_seed(bins)
    probs = torch.rand(3, bins, generator=g, dtype=torch.float64) ** 4
    probs[1, : bins // 2] = 0.0
    probs[1, -1] += 0.1
    probs /= probs.sum(1, keepdim=True)
    h = Histogram(lo=torch.zeros(3), width=torch.ones(3), probs=probs.float())
    packed, _, _ = h.alias_table()
    b = slot_bits(bins)
    assert packed.shape == (3, 1 << b) and (1 << b) >= bins and (b == 1 or (1 << b) // 2 < bins)
    one = 1 << (32 - b)
    for c in range(3):
        units = [0] * bins
        pointing = [1] * bins
        for s, e in enumerate(packed[c].tolist()):
            t, a = e >> b, e & ((1 << b) - 1)
            assert 0 <= t < one and a < bins
            if s < bins:
                units[s] += t
            units[a] += one - t
            pointing[a] += 1
        assert sum(units) == 1 << 32
        p = h.probs[c].double() / h.probs[c].double().sum()
        for j in range(bins):
            assert abs(units[j] - float(p[j]) * 2**32) <= pointing[j] + 1e-3


def _hist(probs: list[float], lo: float = -1.0, width: float = 0.25) -> Histogram:
    p = torch.tensor([probs], dtype=torch.float32)
    return Histogram(lo=torch.tensor([lo]), width=torch.tensor([width]), probs=p / p.sum())


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_sampling_matches_histogram(backend: str) -> None:
    probs = [0.002, 0.05, 0.3, 0.1, 0.0005, 0.2, 0.25, 0.0975]
    h = _hist(probs)
    n = 200_000
    torch.manual_seed(0)
    xi = add_noise(torch.zeros(n), h, backend=backend)  # type: ignore[arg-type]
    k = torch.floor((xi.double() + 1.0) / 0.25).long()
    assert int(k.min()) >= 0 and int(k.max()) <= 7
    counts = torch.bincount(k, minlength=8).double()
    expected = torch.tensor(probs, dtype=torch.float64) / sum(probs) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom: P(chi2 > 24.3) = 0.001
    # uniform inside the bins: the position within a bin has mean 1/2 and variance 1/12
    frac = (xi.double() + 1.0) / 0.25 - k
    assert float(frac.mean()) == pytest.approx(0.5, abs=4 * math.sqrt(1 / 12 / n))
    assert float(frac.var()) == pytest.approx(1 / 12, abs=0.002)
    assert float(xi.double().mean()) == pytest.approx(float(h.mean()), abs=5 * math.sqrt(float(h.variance()) / n))


def test_per_channel_sampling_uses_each_rows_histogram() -> None:
    c = 5
    probs = torch.full((c, 10), 0.1)
    h = Histogram(lo=torch.arange(c, dtype=torch.float32) * 10, width=torch.full((c,), 0.1), probs=probs, channel_dim=1)
    torch.manual_seed(1)
    y = torch.zeros(64, c, 7, 3)
    xi = add_noise(y, h, backend="eager")
    for j in range(c):
        v = xi[:, j]
        assert float(v.min()) >= 10 * j and float(v.max()) <= 10 * j + 1.0
        assert float(v.mean()) == pytest.approx(10 * j + 0.5, abs=0.03)


def test_compiled_equals_eager_and_is_repeatable() -> None:
    h = _hist([0.1, 0.2, 0.3, 0.4])
    y = torch.randn(4, 50_000)
    torch.manual_seed(5)
    a = add_noise(y, h, backend="eager")
    torch.manual_seed(5)
    b = add_noise(y.clone(), h, backend="compiled")
    torch.manual_seed(5)
    c = add_noise(y, h, backend="eager")
    assert torch.equal(a, b)  # bit for bit
    assert torch.equal(a, c)
    assert not torch.equal(add_noise(y, h, backend="eager"), c)  # the next draw differs


def _h32(v: int) -> int:
    m32 = 0xFFFFFFFF
    v ^= v >> 16
    v = (v * 0x7FEB352D) & m32
    v ^= v >> 15
    v = (v * 0x846CA68B) & m32
    return v ^ (v >> 16)


def _reference_words(key: int, i: int) -> tuple[int, int]:
    """``(u, r)`` of element ``i`` by the formula of ``abfp.finetune.hash32``, in plain Python integers."""
    m32, m64 = 0xFFFFFFFF, (1 << 64) - 1
    z = (key + ((i >> 32) + 1) * 0x9E3779B97F4A7C15) & m64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
    z ^= z >> 31
    x = i & m32
    return _h32((x * 0x9E3779B9 + (z & m32)) & m32), _h32((x * 0x85EBCA77 + (z >> 32)) & m32)


def _reference_draw(key: int, i: int, packed: list[int], lo: float, width: float) -> float:
    """The formula of the sampler's docstring in plain Python integers (one element)."""
    u, r = _reference_words(key, i)
    b = len(packed).bit_length() - 1
    s = u >> (32 - b)
    e = packed[s]
    k = s if (u & ((1 << (32 - b)) - 1)) < (e >> b) else e & ((1 << b) - 1)
    f32 = np.float32
    pos = f32(k) + f32(r >> 8) * f32(2.0**-24)
    return float(f32(lo) + f32(width) * pos)


def test_hash_words_follow_the_formula_across_segments() -> None:
    """The torch words at indices on both sides of 2^32 and 2^33 (each 2^32 segment has its own key)."""
    key = 0x1234_5678_9ABC_DEF
    idx = [0, 1, 2, 5, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 7, 2**40 + 3]
    u, r = words(key, torch.tensor(idx))
    assert list(zip(u.tolist(), r.tolist())) == [_reference_words(key, i) for i in idx]
    assert _reference_words(key, 2**32 + 1) != _reference_words(key, 1)


def test_draws_follow_the_documented_formula() -> None:
    for probs in ([0.3, 0.05, 0.4, 0.25], [0.3, 0.05, 0.4, 0.2, 0.05]):  # 4 slots; 8 slots for 5 bins
        h = _hist(probs)
        packed, lo, width = h.alias_table()
        key = 0x5DEECE66D12345
        y = torch.zeros(3000)
        expected = [_reference_draw(key, i, packed[0].tolist(), float(lo[0]), float(width[0])) for i in range(3000)]
        got_eager = noisy_eager(y.view(1, 1, -1), key, packed, lo, width).view(-1)
        assert got_eager.tolist() == expected
        if alias_kernel.usable():
            got = y.clone()
            alias_kernel.add_alias_noise_(got, (1, 1, 3000), key, *h.kernel_tables())
            assert got.tolist() == expected


def _random_hist(g: torch.Generator, channels: int, bins: int, channel_dim: int | None) -> Histogram:
    probs = torch.rand(channels, bins, generator=g) ** 3 + 1e-4
    return Histogram(lo=torch.randn(channels, generator=g), width=torch.rand(channels, generator=g),
                     probs=probs / probs.sum(1, keepdim=True), channel_dim=channel_dim)


@pytest.mark.skipif(not alias_kernel.usable(), reason="numba not usable")
@pytest.mark.parametrize("case", range(12))
def test_compiled_kernel_equals_eager_on_random_layouts(case: int) -> None:
    """Per layer and per channel, channel runs longer and shorter than the kernel's blocks and
    chunks (a linear layer's channel is the last dimension: runs of one element)."""
    g = torch.Generator().manual_seed(100 + case)
    nd = int(torch.randint(1, 5, (1,), generator=g))
    shape = tuple(int(v) for v in torch.randint(1, 9, (nd,), generator=g))
    if case % 3 == 0:  # long runs, several chunks
        shape = shape[:-1] + (alias_kernel.CHUNK + 3 * alias_kernel.BLOCK + 7,)
    per_channel = case % 2 == 1
    dim = int(torch.randint(0, nd, (1,), generator=g)) if per_channel else None
    h = _random_hist(g, shape[dim] if dim is not None else 1, int(torch.randint(1, 130, (1,), generator=g)), dim)
    y = torch.randn(shape, generator=g)
    torch.manual_seed(case)
    a = add_noise(y, h, backend="eager")
    torch.manual_seed(case)
    b = add_noise(y.clone(), h, backend="compiled")
    assert torch.equal(a, b)


@pytest.mark.skipif(not avx2_lookup.USABLE, reason="no AVX2 gather on this CPU (or numba absent)")
@pytest.mark.parametrize("bits", [1, 4, 7, 16])
def test_gather_lookup_equals_the_scalar_loop(bits: int) -> None:
    """The eight-at-a-time AVX2 look-up gives the scalar loop's bins on random words and
    tables (block lengths not multiples of 8: the scalar tail)."""
    rng = np.random.default_rng(bits)
    tab = rng.integers(0, 2**32, 1 << bits, dtype=np.uint64).astype(np.uint32)
    tab = (tab & np.uint32(~((1 << bits) - 1) & 0xFFFFFFFF)) | rng.integers(0, 1 << bits, 1 << bits).astype(np.uint32)
    for m in (8, 13, 512):
        u = rng.integers(0, 2**32, m, dtype=np.uint64).astype(np.uint32)
        a, b = np.full(m, -1, np.float32), np.full(m, -1, np.float32)
        alias_kernel._lookup_scalar(tab, u, a, 0, m, bits)
        alias_kernel._lookup_gather(tab, u, b, 0, m, bits)
        assert np.array_equal(a, b) and bool((a >= 0).all())


@pytest.mark.skipif(not avx512_block.USABLE, reason="no AVX-512 on this CPU (or numba absent)")
@pytest.mark.parametrize("bits", [1, 3, 5, 6, 7])
def test_sixteen_lane_block_equals_the_scalar_loop(bits: int) -> None:
    """The AVX-512 pass with the table in registers (:mod:`abfp.finetune.avx512_block`) gives the
    scalar loop's bits, on random tables padded to 128 slots, block lengths with and without a
    scalar tail, and counters that wrap past 2^32 inside the block."""
    rng = np.random.default_rng(bits)
    tab = rng.integers(0, 2**32, 1 << bits, dtype=np.uint64).astype(np.uint32)
    tab = (tab & np.uint32(~((1 << bits) - 1) & 0xFFFFFFFF)) | rng.integers(0, 1 << bits, 1 << bits).astype(np.uint32)
    row = alias_kernel.padded(tab[None, :])[0]
    assert row.shape == (128,) and bool((row[1 << bits:] == 0).all())
    u32, f32 = np.uint32, np.float32
    for m, x0 in ((16, 0), (37, 12345), (512, 2**32 - 100), (5, 7)):
        y = rng.standard_normal(m).astype(np.float32)
        a, b = y.copy(), y.copy()
        args = (u32(x0), u32(0x9E3779B9), u32(0x12345678), row, bits, f32(-0.75), f32(0.0137))
        alias_kernel._run_scalar(a, 0, *args)
        alias_kernel._run16(b, *args)
        assert np.array_equal(a, b) and not np.array_equal(a, y)


@pytest.mark.skipif(not alias_kernel.usable(), reason="numba not usable")
def test_compiled_adds_in_place_and_keeps_views_apart() -> None:
    h = _hist([0.5, 0.5])
    y = torch.zeros(6, 8)
    out = add_noise(y, h, backend="compiled")
    assert out is y and bool((y != 0).any())  # the layer's own output: no new tensor
    base = torch.zeros(8, 6)
    view = base.t()  # not contiguous: a new tensor, the base untouched
    out = add_noise(view, h, backend="compiled")
    assert bool((base == 0).all()) and bool((out != 0).any())
    base = torch.zeros(4, 6)
    row = base[1]  # a contiguous view of part of its storage: a new tensor too
    out = add_noise(row, h, backend="compiled")
    assert bool((base == 0).all()) and out.data_ptr() != row.data_ptr()
    lin = torch.nn.Linear(6, 5)
    y = lin(torch.randn(2, 3, 6))  # a view of all of addmm's output (F.linear on 3-D input)
    assert y._base is not None
    before = y.detach().clone()
    assert add_noise(y, h, backend="compiled") is y and not torch.equal(y.detach(), before)
    w = torch.zeros(3, 4, requires_grad=True)  # a parameter: never written
    out = add_noise(w, h, backend="compiled")
    assert bool((w == 0).all()) and out is not w
    out = add_noise(w.view(12), h, backend="compiled")  # nor through a view of it
    assert bool((w == 0).all())


@pytest.mark.skipif(not alias_kernel.usable(), reason="numba not usable")
def test_in_place_noise_trips_autograd_on_a_saved_output() -> None:
    """Written in place outside autograd, the output's version still moves: a producer that
    saved its output for backward (``exp``) makes backward raise instead of using noisy values."""
    x = torch.randn(5, requires_grad=True)
    y = add_noise(x.exp(), _hist([0.5, 0.5]), backend="compiled")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_per_channel_sampling_matches_each_row(backend: str) -> None:
    """Chi-square of each channel's bins, channel as the last dimension (runs of one element)."""
    if backend == "compiled" and not alias_kernel.usable():
        pytest.skip("numba not usable")
    c = 3
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.02, 0.08, 0.9]])
    h = Histogram(lo=torch.tensor([0.0, 10.0, 20.0]), width=torch.ones(c), probs=probs, channel_dim=-1)
    n = 60_000
    torch.manual_seed(3)
    xi = add_noise(torch.zeros(n, c), h, backend=backend)  # type: ignore[arg-type]
    for j in range(c):
        k = torch.floor(xi[:, j].double() - 10 * j).long()
        assert int(k.min()) >= 0 and int(k.max()) <= 2
        counts = torch.bincount(k, minlength=3).double()
        expected = probs[j].double() * n
        assert float(((counts - expected) ** 2 / expected).sum()) < 13.8  # 2 d.o.f.: P(> 13.8) = 0.001


def test_gradient_is_identity() -> None:
    h = _hist([0.5, 0.5])
    y = torch.randn(4, 6, requires_grad=True)
    out = add_noise(y, h, backend="eager")
    (out * torch.arange(6.0)).sum().backward()
    assert y.grad is not None
    torch.testing.assert_close(y.grad, torch.arange(6.0).expand(4, 6))


@pytest.mark.skipif(not alias_kernel.usable(), reason="numba not usable")
def test_in_place_noise_keeps_autograd_right() -> None:
    """The compiled sampler writes into a layer's output; backward through convolution,
    linear layer (2-D and 3-D input: a view of its output) and batched product gives the gradients of the same graph with the same
    noise added out of place."""
    g = torch.Generator().manual_seed(0)
    conv, lin = torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(12, 5)
    x = torch.randn(4, 2, 4, 4, generator=g)
    h = _hist([0.2, 0.3, 0.5])

    def run(backend: str) -> tuple[torch.Tensor, ...]:
        conv.zero_grad()
        lin.zero_grad()
        torch.manual_seed(9)
        a = add_noise(conv(x), h, backend=backend)  # type: ignore[arg-type]
        b = add_noise(lin(a.flatten(1)), h, backend=backend)  # type: ignore[arg-type]
        c = add_noise(b.unsqueeze(2) @ b.unsqueeze(1), h, backend=backend)  # type: ignore[arg-type]
        d = add_noise(lin(a.reshape(2, 2, 12)), h, backend=backend)  # type: ignore[arg-type]
        (c.tanh().sum() + b.square().sum() + d.sin().sum()).backward()
        return c.detach(), conv.weight.grad.clone(), lin.weight.grad.clone()  # type: ignore[union-attr]

    for e, k in zip(run("eager"), run("compiled")):
        assert torch.equal(e, k)


def test_mean_and_variance_formulas() -> None:
    h = _hist([0.25, 0.75], lo=0.0, width=2.0)  # uniform on [0,2) w.p. 1/4, on [2,4) w.p. 3/4
    assert float(h.mean()) == pytest.approx(0.25 * 1 + 0.75 * 3)
    second = 0.25 * (1 + 4 / 12) + 0.75 * (9 + 4 / 12)
    assert float(h.variance()) == pytest.approx(second - 2.5**2)


def test_compiled_backend_refuses_what_it_cannot_run() -> None:
    h = _hist([0.5, 0.5])
    with pytest.raises(ValueError, match="float32 CPU tensor"):
        add_noise(torch.zeros(4, dtype=torch.float64), h, backend="compiled")
    with pytest.raises(ValueError, match="backend must be"):
        add_noise(torch.zeros(4), h, backend="fast")  # type: ignore[arg-type]
    auto = add_noise(torch.zeros(4, dtype=torch.float64), h)  # auto: the eager sampler
    assert auto.dtype == torch.float64


def test_wrong_channel_count_is_refused_every_time() -> None:
    """The layout of a shape is kept per histogram once it passed the check; a shape that fails
    it fails again on the next call (nothing kept)."""
    h = Histogram(lo=torch.zeros(3), width=torch.ones(3), probs=torch.full((3, 2), 0.5), channel_dim=1)
    for _ in range(2):
        with pytest.raises(ValueError, match="4 channels along dim 1, the histogram 3"):
            add_noise(torch.zeros(2, 4), h)
    assert add_noise(torch.zeros(2, 3), h).shape == (2, 3)
    assert add_noise(torch.zeros(5, 3), h).shape == (5, 3)
