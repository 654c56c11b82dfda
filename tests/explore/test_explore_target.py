"""The target rule and family names."""

import math

import pytest

from abfp.explore.designs import Design, family_name
from abfp.explore.target import Target


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
