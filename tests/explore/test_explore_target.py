"""The target rule and family names."""

import math
import statistics

import pytest
from hypothesis import given, settings, strategies as st

from abfp.explore.designs import Design, family_name
from abfp.explore.target import Target, bounded_decision, decided


@pytest.mark.parametrize("fp32,higher,drop,expected", [
    (90.0, True, 1.0, 89.1), (0.5, False, 10.0, 0.55), (-2.0, True, 50.0, -3.0), (0.98, True, 0.0, 0.98)])
def test_relative_target(fp32, higher, drop, expected):
    t = Target(drop_percent=drop).value(fp32, higher)
    assert t == pytest.approx(expected)
    assert Target.meets(t, t, higher)  # the target itself meets it
    worse = t - 1e-9 if higher else t + 1e-9
    assert not Target.meets(worse, t, higher)


def test_absolute_target_ignores_fp32():
    assert Target(drop_percent=None, absolute=0.97).value(123.0) == 0.97


def test_nan_never_meets():
    assert not Target.meets(math.nan, 1.0) and not Target.meets(math.nan, 1.0, False)


@pytest.mark.parametrize("kw,match", [
    (dict(drop_percent=None), "exactly one"), (dict(drop_percent=1.0, absolute=2.0), "exactly one"),
    (dict(drop_percent=-1.0), "target drop"), (dict(drop_percent=math.inf), "finite"),
    (dict(drop_percent=None, absolute=math.nan), "finite")])
def test_bad_targets(kw, match):
    with pytest.raises(ValueError, match=match):
        Target(**kw)


def test_relative_target_of_a_zero_fp32_metric_asks_for_an_absolute_one():
    with pytest.raises(ValueError, match="absolute target"):
        Target(drop_percent=1.0).value(0.0, higher_is_better=False)  # e.g. KL divergence to float32


def test_family_names():
    assert family_name("fixed", 8) == "fixed-n8"
    assert family_name("abfp", 128, True) == "abfp-n128-auto"
    assert family_name("abfp", 32, False, 0.5) == "abfp-n32@noise=0.5"
    d = Design("abfp", 32, 8, 8, 6, "auto", 0.0)
    cfg = d.config(__import__("abfp").ABFPConfig())
    assert (cfg.mode, cfg.tile_width, cfg.output_bits, cfg.gain, cfg.noise_std) == ("abfp", 32, 6, 1.0, 0.0)
    assert d.point(cfg).auto_gain


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 300), runs=st.integers(1, 5), data=st.data(), target=st.floats(0.0, 100.0),
       higher=st.booleans())
def test_bounded_decision_is_the_decision_of_every_completion(n, runs, data, target, higher):
    """A percentage of n samples, k of ``runs`` runs made: a decision must be the one the mean of
    all runs gives whatever the remaining runs score (checked on the extremes and random
    completions); no decision only when the remaining runs can still put the mean on either side."""
    k = data.draw(st.integers(1, runs))
    pct = st.integers(0, n).map(lambda h: 100.0 * h / n)
    made = data.draw(st.lists(pct, min_size=k, max_size=k))
    got = bounded_decision(made, runs, (0.0, 100.0), target, higher)
    rest = runs - k
    completions = [[0.0] * rest, [100.0] * rest] + [data.draw(st.lists(pct, min_size=rest, max_size=rest))
                                                    for _ in range(3)]
    sides = {Target.meets(statistics.fmean(made + c), target, higher) for c in completions}
    if got is not None:
        assert sides == {got}
    else:  # the extremes fall on both sides (with every run made the mean is known: always decided)
        assert rest > 0
        assert len({Target.meets(statistics.fmean(made + c), target, higher) for c in completions[:2]}) == 2


@pytest.mark.parametrize("values,runs,expected", [
    ([96.88], 2, True),    # the second run would need 101.12 %: fails for certain
    ([96.09], 2, True),
    ([99.22], 2, False),   # one flipped crop of 128: 0.78 % stderr, 0.22 from the target: open
    ([98.0], 2, False),    # a second run at 100 % would give exactly 99: open
    ([97.9], 3, False),    # two more runs at 100 % reach 99.3
])
def test_decided_with_the_metric_bounds(values, runs, expected):
    se = [100.0 * (0.9 * 0.1 / 127) ** 0.5]  # the per-sample stderr alone decides none of these at z = 3
    assert not decided(values, se, 99.0, 3.0)
    assert decided(values, se, 99.0, 3.0, runs=runs, bounds=(0.0, 100.0)) is expected


def test_bounds_that_a_value_contradicts_decide_nothing():
    assert bounded_decision([101.0], 2, (0.0, 100.0), 99.0) is None
    assert bounded_decision([50.0], 2, (0.0, 100.0), 99.0) is False
    assert bounded_decision([5.0], 1, (0.0, 100.0), 10.0, higher_is_better=False) is True
    assert bounded_decision([60.0], 2, (0.0, 100.0), 10.0, higher_is_better=False) is False  # lower is better
    assert bounded_decision([5.0], 2, (0.0, 100.0), 10.0, higher_is_better=False) is None
