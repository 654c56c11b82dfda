"""A converted call that raises leaves no counts behind: ``abfp.coverage`` and the records behind
``abfp.summary`` / energy are those of the calls that returned (abfp.ops.site, "No count outlives a
failed call"); a failure caught inside a forward rolls back the failed submodule call alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import abfp
from abfp import ABFPConfig
from abfp.ops.coverage import DigitalProductWarning

CFG = ABFPConfig(noise_std=0.0, tile_width=8)


class Boom(Exception):
    pass


class Flaky(nn.Module):
    """A linear layer then a float32-only product (``torch.cdist``: counted as digital), then it
    raises while ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.fail = False

    def forward(self, x):
        y = self.fc(x)
        y = y + torch.cdist(y, y).sum()
        if self.fail:
            raise Boom("flaky")
        return y


class Retrying(nn.Module):
    """Runs ``inner`` (a :class:`Flaky`); when it fails, switches it off failing and calls it again."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Flaky()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        try:
            y = self.inner(x)
        except Boom:
            self.inner.fail = False
            y = self.inner(x)
        return self.head(y)


def _counts(model) -> tuple:
    c = abfp.coverage(model)
    return c.analog_macs, c.digital_macs, dict(c.digital_ops)


@pytest.fixture
def model():
    torch.manual_seed(0)
    with pytest.warns(DigitalProductWarning):  # cdist: no analog model
        m = abfp.convert(Retrying(), CFG)
        with torch.no_grad():
            m(torch.randn(2, 16))  # one good call: some counts to keep
    return m


def test_a_failed_forward_leaves_the_counts_of_the_calls_before_it(model):
    before = _counts(model)
    assert before[0] > 0 and before[1] > 0
    model.head.register_forward_pre_hook(lambda mod, args: (_ for _ in ()).throw(Boom("head")))
    with torch.no_grad(), pytest.raises(Boom, match="head"):
        model(torch.randn(2, 16))  # the inner products ran, then the head refused
    assert _counts(model) == before


def test_a_failure_caught_inside_the_forward_counts_only_the_retry(model):
    x = torch.randn(2, 16)
    before = _counts(model)
    with torch.no_grad():
        model(x)
    mid = _counts(model)
    once = (mid[0] - before[0], mid[1] - before[1])
    model.inner.fail = True  # the first inner call raises after its two products; the retry returns
    with torch.no_grad():
        model(x)
    assert model.inner.fail is False  # the retry ran
    after = _counts(model)
    assert (after[0] - mid[0], after[1] - mid[1]) == once  # as one good call: the failed attempt is gone
    (op,) = after[2]
    assert after[2][op] - mid[2][op] == mid[2][op] - before[2][op] > 0


def test_a_failed_training_forward_keeps_training_counts(model):
    model.train()
    x = torch.randn(2, 16)
    model(x).sum().backward()  # a training step's forward and backward count as one forward
    trained = _counts(model)
    model.head.register_forward_pre_hook(lambda mod, args: (_ for _ in ()).throw(Boom("head")))
    with pytest.raises(Boom):
        model(x)
    assert _counts(model) == trained
    assert model.inner.fc.weight.grad is not None


def test_summary_records_of_a_retried_submodule_are_those_of_one_call(model):
    x = torch.randn(2, 16)
    plain = {r.site: (r.calls, r.macs, r.adc_conversions) for r in abfp.summary(model, x).rows}
    model.inner.fail = True
    retried = {r.site: (r.calls, r.macs, r.adc_conversions) for r in abfp.summary(model, x).rows}
    assert retried == plain
    assert all(calls == 1 for calls, _, _ in plain.values())
