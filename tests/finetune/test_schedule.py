"""The warm-up + cosine learning-rate factor (:func:`abfp.finetune.loop.warmup_cosine`)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abfp.finetune.loop import warmup_cosine


def test_known_rates() -> None:
    # 10 steps, 2 of warm-up: 0.5, 1 (the peak), then the cosine over the 8 remaining steps
    got = [warmup_cosine(s, 10, 2) for s in range(10)]
    assert got[:2] == [0.5, 1.0]
    assert got[2] == 1.0
    assert got[6] == pytest.approx(0.5, abs=1e-12)  # half-way through the decay: cos(pi/2)
    assert got[9] == pytest.approx((1 + math.cos(math.pi * 7 / 8)) / 2, rel=1e-12)
    assert 0 < got[9] < 0.04  # the last step is nearly, not exactly, zero
    # no warm-up: the first step at the peak
    assert warmup_cosine(0, 5) == 1.0
    assert warmup_cosine(4, 5) == pytest.approx((1 + math.cos(math.pi * 4 / 5)) / 2, rel=1e-12)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(steps=st.integers(2, 3000), data=st.data())
def test_shape(steps: int, data: st.DataObject) -> None:
    warmup = data.draw(st.integers(0, steps - 1))
    f = [warmup_cosine(s, steps, warmup) for s in range(steps)]
    assert all(0 < v <= 1 for v in f)
    assert f[:warmup] == [(s + 1) / warmup for s in range(warmup)]  # linear, up to the peak
    assert f[warmup] == 1.0
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))  # then never rises
    # the mean over the decay is about a half (the integral of (1 + cos) / 2 over [0, pi] / pi)
    if steps - warmup >= 100:
        assert sum(f[warmup:]) / (steps - warmup) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("args", [(5, 5, 0), (-1, 5, 0), (0, 5, 5), (0, 0, 0), (0, 5, -1), (1.0, 5, 0), (True, 5, 0)])
def test_bad_input(args: tuple) -> None:
    with pytest.raises(ValueError, match="warmup_cosine"):
        warmup_cosine(*args)
