"""Raising the DACs when a family cannot meet the target at the base DAC bits, implied failures
(monotone in every converter's bits) and the screen on a few samples, on the tiny task."""

from pathlib import Path

import pytest

import abfp
from abfp import ABFPConfig
from abfp.evaluate import runner
from abfp.evaluate.grid import Point
from abfp.explore.search import SearchSpace

TASK = str(Path(__file__).with_name("explore_tiny_task.py")) + ":make"
# 3-bit DACs: no ADC resolution meets 99 % top-1 on the tiny task (checked below)
LOW_DACS = dict(formats=("abfp",), tile_widths=(8,), gains=(4, 8), auto_gain=False, noise_stds=(0.0,),
                adc_bits=(3, 10), runs=1, progress=False, base=ABFPConfig(input_bits=3, weight_bits=3))


def _task():
    from explore_tiny_task import make  # noqa: PLC0415  (the test folder is on sys.path)

    t = make()
    return t.build_model(), t.load_data(), t.metric


def _value(bits, gain, **kw):
    """The tiny task's metric at one design, by abfp.evaluate directly (independent of the explorer)."""
    model, data, metric = _task()
    w, x, y = bits
    cfg = ABFPConfig(tile_width=8, weight_bits=w, input_bits=x, output_bits=y, gain=gain, noise_std=0.0)
    (r,) = runner.evaluate(model, data, metric, [Point("abfp", cfg)], progress=False, runs=1, batch_size=48, **kw)
    return r["value"]


@pytest.fixture(scope="module")
def raised():
    return abfp.explore(TASK, dac_max_bits=10, **LOW_DACS)


@pytest.mark.slow  # explores a tiny model (seconds)
def test_without_raising_no_design_meets_the_target():
    res = abfp.explore(TASK, **LOW_DACS)
    assert res["cheapest"] == {"abfp-n8": None}
    assert res["adc_search_dac_bits"] == {"abfp-n8": [3, 3]}


@pytest.mark.slow  # explores a tiny model (seconds)
def test_raised_dacs_are_a_true_threshold(raised):
    best = raised["cheapest"]["abfp-n8"]
    assert best is not None and best["meets_target"]
    xb, wb = raised["adc_search_dac_bits"]["abfp-n8"]
    assert xb == wb > 3
    hi = LOW_DACS["adc_bits"][1]
    g = best["gain"]
    # checked with abfp.evaluate itself: b DAC bits meet the target at the highest ADC bits, b - 1 do not
    assert _value((wb, xb, hi), g) >= raised["target"]
    assert _value((wb - 1, xb - 1, hi), g) < raised["target"]
    # the fewest ADC bits at the raised DACs is a threshold too
    b = raised["min_adc_bits"]["abfp-n8"]
    assert b is not None and _value((wb, xb, b), g) >= raised["target"]
    if b > LOW_DACS["adc_bits"][0]:
        assert _value((wb, xb, b - 1), g) < raised["target"]


@pytest.mark.slow  # explores a tiny model (seconds)
def test_no_design_is_evaluated_that_a_failure_already_implied(raised):
    """Every evaluated design: no failing design of the same device evaluated before it had at
    least as many bits in every converter; every implied failure names such a design."""
    ds = raised["designs"]
    key = ("format", "tile_width", "gain", "noise_std")

    def covers(a, b):  # a has at least b's bits everywhere
        return all(a[k] >= b[k] for k in ("input_bits", "weight_bits", "output_bits"))

    for i, d in enumerate(ds):
        assert not any(not e["meets_target"] and all(e[k] == d[k] for k in key) and covers(e, d) for e in ds[:i])
    assert raised["implied_failures"]
    labels = {f"abfp n=8 {e['weight_bits']}/{e['input_bits']}/{e['output_bits']} G={e['gain']:g} noise=0": e
              for e in ds}
    for f in raised["implied_failures"]:
        e = labels[f["implied_by"]]
        assert not e["meets_target"] and covers(e, f)
        assert _value((f["weight_bits"], f["input_bits"], f["output_bits"]), f["gain"]) < raised["target"]


@pytest.fixture(scope="module")
def screened():
    return abfp.explore(TASK, dac_max_bits=10, screen=24, screen_z=1.0, **LOW_DACS)


@pytest.mark.slow  # explores a tiny model twice (seconds)
def test_the_screen_rejects_only_clear_failures_and_keeps_the_answer(raised, screened):
    res = screened
    out = [d for d in res["designs"] if d["screened_out"]]
    assert out  # the screen saved full evaluations ...
    full = {(d["weight_bits"], d["input_bits"], d["output_bits"], d["gain"]): d for d in raised["designs"]}
    for d in out:
        assert d["samples"] == 24 and not d["meets_target"]
        assert not full[(d["weight_bits"], d["input_bits"], d["output_bits"], d["gain"])]["meets_target"]
    for d in res["designs"]:
        if not d["screened_out"]:
            assert d["samples"] == 48
    fields = ("input_bits", "weight_bits", "output_bits", "gain", "value", "energy_pj_per_inference")
    a, b = res["cheapest"]["abfp-n8"], raised["cheapest"]["abfp-n8"]
    assert [a[k] for k in fields] == [b[k] for k in fields]  # ... and did not change the answer
    from abfp.explore.report import format_explore_table  # noqa: PLC0415

    text = format_explore_table(res)
    xb, wb = res["adc_search_dac_bits"]["abfp-n8"]
    assert f"screen on 24 samples ({len(out)} designs rejected there)" in text
    assert f"DACs raised up to 10 bits where needed (abfp-n8: {xb}/{wb})" in text


@pytest.mark.slow  # explores a tiny model (seconds)
def test_the_screen_is_skipped_only_above_a_design_that_passed_it(raised, monkeypatch):
    """A design with at least the bits of a design of the same device that passed the screen is
    evaluated on all samples without a screen (``screen_skipped_by`` names that design); every
    other design is screened first. Counted independently: the screen's passes."""
    kw = dict(dac_max_bits=10, screen=24, screen_z=3.0, **LOW_DACS)
    screens = []
    real = runner.evaluate

    def evaluate(model, data, *a, **k):
        if len(data) == 24 and a[1][0].format != "fp32":
            screens.append(a[1][0])
        return real(model, data, *a, **k)

    monkeypatch.setattr("abfp.explore.search.evaluate", evaluate)
    res = abfp.explore(TASK, **kw)
    ds = res["designs"]
    key = ("format", "tile_width", "gain", "noise_std")
    bits = ("input_bits", "weight_bits", "output_bits")
    label = lambda e: f"abfp n=8 {e['weight_bits']}/{e['input_bits']}/{e['output_bits']} G={e['gain']:g} noise=0"  # noqa: E731
    skipped = [d for d in ds if "screen_skipped_by" in d]
    assert skipped  # the tiny search has designs above a screened one
    for i, d in enumerate(ds):
        below = [e for e in ds[:i] if not e["screened_out"] and all(e[k] == d[k] for k in key)
                 and all(e[b] <= d[b] for b in bits)]
        if below:
            assert d["screen_skipped_by"] in {label(e) for e in below}
            assert not d["screened_out"] and d["samples"] == 48
        else:
            assert "screen_skipped_by" not in d
    assert len(screens) == len(ds) - len(skipped)  # the skipped screens were not run
    fields = ("input_bits", "weight_bits", "output_bits", "gain", "value", "energy_pj_per_inference")
    a, b = res["cheapest"]["abfp-n8"], raised["cheapest"]["abfp-n8"]
    assert [a[k] for k in fields] == [b[k] for k in fields]  # the answer of the search without a screen


@pytest.mark.slow  # evaluates a tiny model (seconds)
def test_a_screen_calibrates_the_same_device_as_the_full_evaluation(monkeypatch):
    """calibration_count: the screen's fixed-point scales come from the same inputs as the full
    evaluation's, not from the first few screened samples."""
    model, data, metric = _task()
    seen = []
    real = runner.calibrate

    def calibrate(m, batches, **k):
        seen.append(batches[0][0].clone())
        return real(m, batches, **k)

    monkeypatch.setattr(runner, "calibrate", calibrate)
    cfg = ABFPConfig(mode="fixed", tile_width=8, noise_std=0.0)
    runner.evaluate(model, data, metric, [Point("fixed", cfg)], progress=False, runs=1, batch_size=48)
    runner.evaluate(model, data, metric, [Point("fixed", cfg)], progress=False, runs=1, batch_size=48, samples=16,
                    calibration=data.take(48), calibration_count=48)
    runner.evaluate(model, data, metric, [Point("fixed", cfg)], progress=False, runs=1, batch_size=48, samples=16)
    assert len(seen) == 3
    assert seen[0].shape[0] == 48 and seen[1].equal(seen[0])
    assert seen[2].shape[0] == 16  # without it: the first screened samples only


@pytest.mark.parametrize("kw,match", [
    (dict(dac_max_bits=1), "DAC maximum"),
    (dict(dac_max_bits=8.5), "DAC maximum"),
    (dict(screen=0), "screen samples"),
    (dict(screen_z=0.0), "screen z"),
    (dict(screen_z=float("inf")), "screen z"),
])
def test_bad_space_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace(**kw)


def test_the_screen_samples_are_spread_over_the_evaluated_ones():
    import torch  # noqa: PLC0415

    from abfp.explore.search import spread  # noqa: PLC0415
    from abfp.zoo.base import Dataset  # noqa: PLC0415

    x = torch.arange(10 * 3).view(10, 3)
    d = spread(Dataset((x,), torch.arange(10) * 2), 4)
    assert d.inputs[0][:, 0].tolist() == [0, 6, 15, 21]  # samples 0, 2, 5, 7 of 10
    assert d.targets.tolist() == [0, 4, 10, 14]
    assert len(spread(Dataset((x,)), 10)) == 10 and spread(Dataset((x,)), 10).inputs[0].equal(x)


@pytest.mark.slow  # explores a tiny model (seconds)
def test_a_screen_and_the_full_evaluation_share_one_calibration_pass():
    """The screen (a few samples) and the full evaluation calibrate on the same inputs, so the
    fixed-point scales and the auto gains of one device are computed once for both: their keys hold
    the model and the calibration inputs, not the evaluated samples."""
    res = abfp.explore(TASK, formats=("fixed", "abfp"), tile_widths=(8,), gains=(), auto_gain=True,
                       noise_stds=(0.0,), adc_bits=(6, 10), dac_search="none", runs=1, progress=False, screen=16)
    full = [d for d in res["designs"] if not d.get("screened_out") and d["samples"] == 48]
    assert {d["format"] for d in full} == {"fixed", "abfp"}  # both devices were also evaluated in full
    assert res["forward_passes"]["scales"] == 1 and res["forward_passes"]["gains"] == 1
