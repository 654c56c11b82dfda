"""The bit search: on a synthetic monotone metric, bisection finds the true threshold, in few calls."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from abfp.explore.bisect import max_calls, smallest_passing
from abfp.explore.target import Target


def synthetic_metric(bits: int, threshold_bits: float) -> float:
    """A model's accuracy against ADC bits: rises steeply, 1 % below float32 (100) at ``threshold_bits``."""
    return 100.0 - 2.0 ** (threshold_bits - bits)


@settings(max_examples=120, deadline=None)
@given(lo=st.integers(2, 12), width=st.integers(0, 14), thr=st.floats(0.0, 30.0), start=st.none() | st.integers(2, 26))
def test_bisection_finds_the_true_threshold_of_a_monotone_metric(lo, width, thr, start):
    hi = lo + width
    target = Target(drop_percent=1.0).value(100.0)  # 99.0
    calls: list[int] = []

    def pred(b: int) -> bool:
        calls.append(b)
        return Target.meets(synthetic_metric(b, thr), target)

    found = smallest_passing(lo, hi, pred, start=start)
    # the truth, by brute force: every bit in range
    truth = next((b for b in range(lo, hi + 1) if synthetic_metric(b, thr) >= target), None)
    assert found == truth
    if found is not None and found > lo:  # the threshold is established: the bit below fails
        assert found - 1 in calls
    assert len(calls) == len(set(calls)), "no design is evaluated twice"
    assert len(calls) <= max_calls(lo, hi) + (1 if start is not None else 0)


@settings(max_examples=60, deadline=None)
@given(lo=st.integers(2, 8), width=st.integers(1, 10), thr=st.integers(0, 20))
def test_known_pass_is_not_evaluated_again(lo, width, thr):
    hi = lo + width
    calls: list[int] = []
    truth_ok = lambda b: b >= thr  # noqa: E731
    if not truth_ok(hi):
        return
    found = smallest_passing(lo, hi, lambda b: calls.append(b) or truth_ok(b), known_pass=hi)
    assert found == max(lo, thr)
    assert hi not in calls


def test_bisection_is_logarithmic():
    calls = []
    assert smallest_passing(2, 1025, lambda b: calls.append(b) or b >= 700) == 700
    assert len(calls) <= 1 + math.ceil(math.log2(1024))


def test_empty_range_and_failing_top():
    assert smallest_passing(5, 4, lambda b: True) is None
    assert smallest_passing(2, 16, lambda b: False) is None


@pytest.mark.parametrize("lo,hi", [(2.5, 8), (2, "8"), (True, 8)])
def test_bad_bounds_are_refused(lo, hi):
    with pytest.raises(ValueError, match="must be an integer"):
        smallest_passing(lo, hi, lambda b: True)


def test_known_pass_outside_the_range_is_refused():
    with pytest.raises(ValueError, match="outside"):
        smallest_passing(2, 8, lambda b: True, known_pass=9)


@settings(max_examples=150, deadline=None)
@given(lo=st.integers(2, 12), width=st.integers(0, 14), thr=st.integers(0, 30))
def test_top_last_finds_the_threshold_and_tests_the_top_only_when_everything_below_fails(lo, width, thr):
    hi = lo + width
    calls: list[int] = []
    found = smallest_passing(lo, hi, lambda b: calls.append(b) or b >= thr, top_last=True)
    truth = next((b for b in range(lo, hi + 1) if b >= thr), None)  # brute force
    assert found == truth
    assert len(calls) == len(set(calls))
    assert len(calls) <= math.ceil(math.log2(hi - lo + 2))
    if truth is not None and truth < hi:
        assert hi not in calls  # the most expensive design is not needed
        hi_first: list[int] = []
        smallest_passing(lo, hi, lambda b: hi_first.append(b) or b >= thr)
        assert len(calls) <= len(hi_first)  # never more calls than testing the top first
    if found is not None and found > lo:
        assert found - 1 in calls  # a threshold: the bit below was seen to fail


def test_top_last_on_the_dac_raise_of_efficientnet():
    """The session-9 search: DACs raised in 9..12 where 11 is the threshold: 10 and 11 (two
    designs) instead of 12, 10, 11."""
    calls: list[int] = []
    assert smallest_passing(9, 12, lambda b: calls.append(b) or b >= 11, top_last=True) == 11
    assert calls == [10, 11]
    calls.clear()
    assert smallest_passing(9, 12, lambda b: calls.append(b) or False, top_last=True) is None
    assert calls == [10, 11, 12]
