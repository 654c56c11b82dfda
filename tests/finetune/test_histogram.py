"""Histogram construction (100 bins, +0.5 per bin, normalised) and the noise sampler."""

from __future__ import annotations

import math

import pytest
import torch

from abfp.finetune.histogram import Histogram, alias_arrays
from abfp.finetune.sampler import add_noise

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
    y = torch.randn(4, 50_000)  # the same layout (1, 1, N) as above: one compilation serves both tests
    torch.manual_seed(5)
    a = add_noise(y, h, backend="eager")
    torch.manual_seed(5)
    b = add_noise(y, h, backend="compiled")
    torch.manual_seed(5)
    c = add_noise(y, h, backend="eager")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(a, c)
    assert not torch.equal(add_noise(y, h, backend="eager"), c)  # the next draw differs


def test_gradient_is_identity() -> None:
    h = _hist([0.5, 0.5])
    y = torch.randn(4, 6, requires_grad=True)
    out = add_noise(y, h, backend="eager")
    (out * torch.arange(6.0)).sum().backward()
    assert y.grad is not None
    torch.testing.assert_close(y.grad, torch.arange(6.0).expand(4, 6))


def test_mean_and_variance_formulas() -> None:
    h = _hist([0.25, 0.75], lo=0.0, width=2.0)  # uniform on [0,2) w.p. 1/4, on [2,4) w.p. 3/4
    assert float(h.mean()) == pytest.approx(0.25 * 1 + 0.75 * 3)
    second = 0.25 * (1 + 4 / 12) + 0.75 * (9 + 4 / 12)
    assert float(h.variance()) == pytest.approx(second - 2.5**2)
