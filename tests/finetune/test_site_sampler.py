"""``SiteSampler``: the least-Python sampler of one DNF site gives :func:`add_noise`'s bits."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from abfp.finetune import alias_kernel
from abfp.finetune.dnf import KeyStream
from abfp.finetune.histogram import Histogram
from abfp.finetune.sampler import SiteSampler, add_noise, noisy_eager, noisy_layout, stream_key

torch.set_num_threads(1)
compiled_only = pytest.mark.skipif(not alias_kernel.usable(), reason="numba not usable")


def _random_hist(seed: int, channels: int, bins: int, channel_dim: int | None) -> Histogram:
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(channels, bins, generator=g) ** 3 + 1e-4
    return Histogram(lo=torch.randn(channels, generator=g), width=torch.rand(channels, generator=g),
                     probs=probs / probs.sum(1, keepdim=True), channel_dim=channel_dim)


class _Keys:
    """A :class:`KeyStream` with a fixed base (no global generator)."""

    def __init__(self, base: int) -> None:
        self.base, self.count = base, 0

    def take(self) -> tuple[int, int]:
        self.count += 1
        return self.base, self.count - 1


def _reference(y: torch.Tensor, hist: Histogram, key: int) -> torch.Tensor:
    """The torch formula (``noisy_eager``) on a copy of ``y``, with the key given."""
    packed, lo, width = hist.alias_table()
    layout = noisy_layout(y.shape, hist.channel_dim)
    return noisy_eager(y.detach().contiguous().view(layout), key, packed, lo, width).view(y.shape)


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("case", range(6))
def test_site_sampler_equals_the_eager_formula(backend: str, case: int) -> None:
    """Per layer and per channel, outputs larger than one kernel chunk, keys at stream positions
    0..3 (the key derived inside the kernel: equal to ``stream_key``), the shape changing between
    calls (the layout recomputed), values bit for bit those of the torch formula."""
    per_channel = case % 2 == 1
    shapes = [(3, 5, 7), (2, alias_kernel.CHUNK + 33), (4, 6), (3, 5, 7)] if case < 4 else [(64, 49, 64), (7, 64)]
    dim = -1 if per_channel else None
    chans = shapes[0][-1] if per_channel else 1
    if per_channel:
        shapes = [s[:-1] + (chans,) for s in shapes]
    hist = _random_hist(case, chans, [3, 100, 130, 64, 100, 17][case], dim)
    sample = SiteSampler(hist, backend)
    base = (0x7FFF_FFFF_FFFF_FFFF - 12345 * case) if case % 3 else 987654321
    keys = _Keys(base)
    g = torch.Generator().manual_seed(case)
    for c, shape in enumerate(shapes):
        y = torch.randn(shape, generator=g)
        want = _reference(y, hist, stream_key(base, c))
        got = sample(y, keys)
        assert torch.equal(got, want), (c, shape)
        assert (got is y) == (backend != "eager" and alias_kernel.usable())  # in place where compiled


@compiled_only
def test_site_sampler_falls_back_where_it_may_not_write() -> None:
    """Views of part of a storage, non-contiguous tensors, parameters and float64 are not written:
    a new tensor, the same values as ``add_noise`` with the stream key."""
    hist = _random_hist(7, 1, 100, None)
    sample = SiteSampler(hist)
    base = torch.zeros(8, 6)
    w = torch.zeros(3, 4, requires_grad=True)
    for i, y in enumerate([base.t(), base[1], w, torch.randn(5, 6, dtype=torch.float64)]):
        keys = _Keys(42 + i)
        before = y.detach().clone()
        got = sample(y, keys)
        want = add_noise(y, hist, key=stream_key(42 + i, 0))
        assert got is not y and torch.equal(y.detach(), before)
        assert torch.equal(got, want)
    assert bool((base == 0).all()) and bool((w == 0).all())
    w2 = torch.zeros(3, 4, requires_grad=True)
    sample(w2, _Keys(1)).sum().backward()  # a parameter: the noise has the identity gradient
    assert torch.equal(w2.grad, torch.ones(3, 4))


@compiled_only
def test_site_sampler_bumps_the_version_and_keeps_autograd_right() -> None:
    """In place, outside autograd: the gradient passes unchanged, a saved output trips backward."""
    hist = _random_hist(3, 1, 100, None)
    x = torch.randn(4, 5, requires_grad=True)
    lin = torch.nn.Linear(5, 3)
    y = lin(x)
    v = y._version
    out = SiteSampler(hist)(y, _Keys(5))
    assert out is y and y._version > v
    out.square().sum().backward()
    with torch.no_grad():
        ref = lin(x) + (y.detach() - lin(x))  # the noisy output itself
    assert torch.allclose(x.grad, (2 * ref) @ lin.weight, rtol=1e-5, atol=1e-6)
    z = x.exp()
    SiteSampler(hist)(z, _Keys(6))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_site_sampler_refuses_the_wrong_channel_count_every_time() -> None:
    hist = _random_hist(1, 4, 10, -1)
    sample = SiteSampler(hist)
    for _ in range(2):
        with pytest.raises(ValueError, match="channels"):
            sample(torch.zeros(3, 5), _Keys(0))
    sample(torch.zeros(3, 4), _Keys(0))
    with pytest.raises(ValueError, match="channels"):
        sample(torch.zeros(3, 5), _Keys(0))
    with pytest.raises(ValueError, match="backend"):
        SiteSampler(hist, "fast")  # type: ignore[arg-type]


class _Counting(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_site_sampler_runs_outside_torch_function_modes() -> None:
    """Under a function mode (a converted module's ``AnalogMode``) the sampler's tensor reads do
    not reach the mode, and the values are those drawn without it."""
    hist = _random_hist(2, 1, 100, None)
    y0 = torch.randn(6, 7)
    want = SiteSampler(hist)(y0.clone(), _Keys(9))
    y, sample = y0.clone(), SiteSampler(hist)
    with _Counting() as mode:
        got = sample(y, _Keys(9))
    assert mode.calls == 0
    assert torch.equal(got, want)


def test_key_stream_take_and_next_agree() -> None:
    torch.manual_seed(3)
    a = KeyStream()
    pairs = [a.take() for _ in range(3)]
    torch.manual_seed(3)
    b = KeyStream()
    assert [b.next() for _ in range(3)] == [stream_key(*p) for p in pairs]
    assert len({p[0] for p in pairs}) == 1 and [p[1] for p in pairs] == [0, 1, 2]


@compiled_only
def test_site_sampler_with_threads_takes_the_parallel_kernel() -> None:
    """More than one torch thread and more than one chunk: ``add_noise``'s parallel launch, the same bits."""
    hist = _random_hist(4, 1, 100, None)
    y = torch.randn(3, alias_kernel.CHUNK + 5)
    want = _reference(y, hist, stream_key(77, 0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = SiteSampler(hist)(y, _Keys(77))
    finally:
        torch.set_num_threads(threads)
    assert got is y and torch.equal(got, want)
