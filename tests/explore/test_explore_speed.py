"""The explorer's speed features: no forward pass for cached designs, auto gains chosen once per
device (and keyed on that rule), early stop of noisy runs, global pruning, the calibration split."""

from pathlib import Path

import pytest
import torch

import abfp
from abfp import ABFPConfig
from abfp.evaluate import runner
from abfp.evaluate.grid import Point
from abfp.evaluate.memo import EvalMemo
from abfp.explore.report import format_explore_table
from abfp.explore.target import decided
from abfp.nn import is_converted
from abfp.zoo.base import Dataset

HERE = Path(__file__).parent
TASK = str(HERE / "explore_tiny_task.py") + ":make"
NOISY = dict(formats=("fixed", "abfp"), tile_widths=(8, 32), gains=(1, 4), auto_gain=True, noise_stds=(0.2887,),
             adc_bits=(3, 9), runs=2, dac_search="none", progress=False)


def _spy(monkeypatch):
    """Count the work evaluate does: analog passes, auto-gain choices, fixed-point calibrations."""
    count = {"analog": 0, "gains": 0, "calibrate": 0, "fp32": 0}
    real_run_all, real_choose, real_calibrate = runner.run_all, runner.choose_gains, runner.calibrate

    def run_all(model, *a, **k):
        count["analog" if is_converted(model) else "fp32"] += 1
        return real_run_all(model, *a, **k)

    def choose_gains(*a, **k):
        count["gains"] += 1
        return real_choose(*a, **k)

    def calibrate(*a, **k):
        count["calibrate"] += 1
        return real_calibrate(*a, **k)

    monkeypatch.setattr(runner, "run_all", run_all)
    monkeypatch.setattr(runner, "choose_gains", choose_gains)
    monkeypatch.setattr(runner, "calibrate", calibrate)
    return count


@pytest.mark.slow  # explores a tiny model three times (seconds)
def test_cached_designs_run_no_forward_pass(tmp_path, monkeypatch):
    cache = str(tmp_path / "runs.sqlite")
    first = _spy(monkeypatch)
    a = abfp.explore(TASK, cache_path=cache, **NOISY)
    assert first["fp32"] == 1  # the float32 reference once per search, not once per design
    assert first["analog"] == a["forward_passes"]["runs"] == sum(d["runs"] for d in a["designs"])
    assert first["gains"] == 2  # auto gains once per device (n = 8, n = 32), not per design
    assert first["calibrate"] == 1  # fixed-point scales: one digital pass for every fixed design
    again = _spy(monkeypatch)
    b = abfp.explore(TASK, cache_path=cache, **NOISY)
    assert again == {"analog": 0, "gains": 0, "calibrate": 0, "fp32": 1}
    assert b["forward_passes"] == {"fp32": 1, "scales": 0, "gains": 0, "runs": 0}
    assert [(d["family"], d["value"], d["std"], d.get("gains")) for d in a["designs"]] == \
           [(d["family"], d["value"], d["std"], d.get("gains")) for d in b["designs"]]


@pytest.mark.slow  # explores a tiny model (seconds)
def test_auto_gains_are_chosen_once_per_device_at_the_base_bits():
    res = abfp.explore(TASK, formats=("abfp",), tile_widths=(8, 32), gains=(), auto_gain=True, noise_stds=(0.0,),
                       adc_bits=(3, 9), dac_search="joint", dac_min_bits=4, runs=1, progress=False)
    assert res["autogain_bits"] == [8, 8, 8]
    for n in (8, 32):
        ds = [d for d in res["designs"] if d["tile_width"] == n]
        assert len({(d["output_bits"], d["input_bits"]) for d in ds}) > 2  # several bit settings ...
        assert all(d["gains"] == ds[0]["gains"] for d in ds)  # ... one choice of gains
    # the choice is the one abfp.evaluate makes at the base device (8/8/8), noise off
    from explore_tiny_task import make  # noqa: PLC0415  (the test folder is on sys.path)

    task = make()
    cfg = ABFPConfig(tile_width=32, noise_std=0.0, gain=1.0)
    (r,) = abfp.evaluate.evaluate(task.build_model(), task.load_data(), task.metric, [Point("abfp", cfg, True)],
                                  progress=False, runs=1, batch_size=48)
    assert [d for d in res["designs"] if d["tile_width"] == 32][0]["gains"] == r["gains"]


def _eval_auto(model, data, metric, cache, **kw):
    cfg = ABFPConfig(tile_width=8, output_bits=5, noise_std=0.0, gain=1.0)
    return runner.evaluate(model, data, metric, [Point("abfp", cfg, auto_gain=True)], cache_path=cache,
                           progress=False, runs=1, batch_size=48, **kw)[0]


@pytest.mark.slow  # a few evaluations of a tiny model (seconds)
def test_the_auto_gain_rule_is_in_the_cache_key(tmp_path, monkeypatch):
    """Gains chosen at the point's own bits, at 8/8/8 and at 8/8/6 are three different results:
    none is served from another's cache entry; a changed model is recomputed too."""
    from explore_tiny_task import make  # noqa: PLC0415

    task = make()
    model, data, metric = task.build_model(), task.load_data(), task.metric
    cache = str(tmp_path / "runs.sqlite")
    runs = []
    for kw in (dict(), dict(autogain_bits=(8, 8, 8)), dict(autogain_bits=(8, 8, 6)),
               dict(autogain_bits=(8, 8, 8), autogain_threshold=0.05)):
        count = _spy(monkeypatch)
        _eval_auto(model, data, metric, cache, **kw)
        runs.append(count["analog"])
        count = _spy(monkeypatch)
        _eval_auto(model, data, metric, cache, **kw)  # the same rule again: from the cache
        assert count["analog"] == 0 and count["gains"] == 0
    assert runs == [1, 1, 1, 1]
    with torch.no_grad():
        model.fc2.weight.mul_(1.5)  # the model changed in place: its stored gains are not reused
    count = _spy(monkeypatch)
    _eval_auto(model, data, metric, cache, autogain_bits=(8, 8, 8))
    assert count["gains"] == 1 and count["analog"] == 1


def test_bad_autogain_bits_are_refused():
    from explore_tiny_task import make  # noqa: PLC0415

    task = make()
    for bad in ((8, 8), (8, 8, 1), (8, 8, 8.0)):
        with pytest.raises(ValueError, match="autogain_bits"):
            _eval_auto(task.build_model(), task.load_data(), task.metric, None, autogain_bits=bad)


@pytest.mark.parametrize("values,stderrs,target,z,expected", [
    ([66.0], [3.0], 93.0, 3.0, True),      # 27 points below, se 3: decided after one run
    ([92.0], [3.0], 93.0, 3.0, False),     # 1 point below, se 3: not decided
    ([92.0, 92.0], [3.0, 3.0], 93.0, 0.4, True),   # se 3/sqrt(2) = 2.12; 1 >= 0.4 * 2.12
    ([92.0, 92.0], [3.0, 3.0], 93.0, 0.5, False),  # 1 < 0.5 * 2.12
    ([90.0, 96.0], [0.0, 0.0], 93.0, 0.1, False),  # the spread between runs counts: mean on target
    ([100.0], [0.0], 99.0, 3.0, False),    # one run, no error estimate: not decided
    ([100.0, 100.0], [0.0, 0.0], 99.0, 3.0, True),
    ([60.0], [None], 93.0, 3.0, False),    # no per-sample error: not decided after one run
    ([], [], 93.0, 3.0, False),
])
def test_decided(values, stderrs, target, z, expected):
    assert decided(values, stderrs, target, z) is expected


@pytest.mark.slow  # explores a tiny model three times (seconds)
def test_early_stop_saves_runs_and_does_not_depend_on_the_cache(tmp_path, monkeypatch):
    kw = dict(NOISY, runs=4, formats=("abfp",), auto_gain=False)
    full = abfp.explore(TASK, **kw)
    count = _spy(monkeypatch)
    early = abfp.explore(TASK, early_stop=2.0, **kw)
    assert count["analog"] == sum(d["runs"] for d in early["designs"]) < 4 * len(early["designs"])
    assert early["search"]["early_stop"] == 2.0
    by_design = {(d["tile_width"], d["gain"], d["output_bits"], d["input_bits"]): d for d in full["designs"]}
    stopped = [d for d in early["designs"] if d["early_stopped"]]
    assert stopped
    for d in early["designs"]:
        f = by_design.get((d["tile_width"], d["gain"], d["output_bits"], d["input_bits"]))
        if f is not None:
            assert d["values"] == f["values"][: d["runs"]]  # the same seeds, fewer of them
            assert d["early_stopped"] == (d["runs"] < 4)
            if d["early_stopped"]:  # stopped far from the target: the full average is on the same side
                assert d["meets_target"] == f["meets_target"]
    # with every run of every design in the cache, early stop gives the same result
    cache = str(tmp_path / "runs.sqlite")
    abfp.explore(TASK, cache_path=cache, **kw)
    cached = abfp.explore(TASK, cache_path=cache, early_stop=2.0, **kw)
    assert [(d["value"], d["runs"]) for d in cached["designs"]] == [(d["value"], d["runs"]) for d in early["designs"]]


@pytest.mark.slow  # explores a tiny model twice (seconds)
def test_global_prune_finds_the_same_cheapest_design_with_fewer_evaluations():
    kw = dict(formats=("fixed", "abfp"), tile_widths=(8, 32), gains=(1, 4), auto_gain=True, noise_stds=(0.0,),
              adc_bits=(3, 10), runs=1, progress=False)
    full = abfp.explore(TASK, **kw)
    pruned = abfp.explore(TASK, global_prune=True, **kw)

    def best(res):
        ok = [d for d in res["cheapest"].values() if d is not None]
        return min(ok, key=lambda d: d["energy_pj_per_inference"])

    b_full, b_pruned = best(full), best(pruned)
    assert b_pruned["energy_pj_per_inference"] == b_full["energy_pj_per_inference"]
    assert {k: b_pruned[k] for k in ("format", "tile_width", "output_bits", "input_bits", "weight_bits")} == \
           {k: b_full[k] for k in ("format", "tile_width", "output_bits", "input_bits", "weight_bits")}
    assert pruned["evaluations"] < full["evaluations"] and pruned["pruned"]
    passing = [d["energy_pj_per_inference"] for d in pruned["designs"] if d["meets_target"]]
    from explore_tiny_task import make  # noqa: PLC0415
    from abfp.energy import account

    task = make()
    x = task.load_data().inputs[0][:1]
    for p in pruned["pruned"]:  # each skipped design costs at least as much as a passing one ...
        assert p["energy_pj_per_inference_at_least"] >= p["dominated_by_energy_pj"] >= min(passing)
        assert p["dominated_by_energy_pj"] in passing
        if p["gain"] != "auto":  # ... even with both DACs at the fewest bits the DAC search tries (2)
            cfg = ABFPConfig(mode=p["format"], tile_width=p["tile_width"], input_bits=min(2, p["input_bits"]),
                             weight_bits=min(2, p["weight_bits"]), output_bits=p["output_bits"], gain=p["gain"],
                             noise_std=0.0)
            floor = account(task.build_model(), x, cfg).totals()["energy_total"]
            assert p["energy_pj_per_inference_at_least"] == pytest.approx(floor, rel=1e-12)
    for fam in pruned["pruned_families"]:
        assert pruned["cheapest"][fam] is None
    assert pruned["search"]["global_prune"] is True
    text = format_explore_table(pruned)  # the table says which families were dominated, not "none meets"
    assert f"global prune ({len(pruned['pruned'])} dominated designs skipped)" in text
    for fam in pruned["pruned_families"]:
        assert any(line.split()[0] == fam and "dominated (global prune)" in line for line in text.splitlines())


def _with_calibration():
    from explore_tiny_task import make  # noqa: PLC0415
    import dataclasses

    task = make()
    calib = Dataset((5.0 * torch.randn(40, 64, generator=torch.Generator().manual_seed(9)),), None)
    return dataclasses.replace(task, load_calibration=lambda: calib), calib


@pytest.mark.slow  # explores a tiny model (seconds)
def test_calibration_comes_from_the_task_calibration_split(monkeypatch):
    task, calib = _with_calibration()
    seen = []
    real_choose, real_calibrate = runner.choose_gains, runner.calibrate

    def choose_gains(model, example_input, *a, **k):
        seen.append(example_input[0])
        return real_choose(model, example_input, *a, **k)

    def calibrate(model, batches, **k):
        seen.append(batches[0][0])
        return real_calibrate(model, batches, **k)

    monkeypatch.setattr(runner, "choose_gains", choose_gains)
    monkeypatch.setattr(runner, "calibrate", calibrate)
    res = abfp.explore(task, formats=("fixed", "abfp"), tile_widths=(32,), gains=(4,), auto_gain=True,
                       noise_stds=(0.0,), adc_bits=(6, 8), dac_search="none", runs=1, progress=False)
    assert res["calibration"] == "calibration split"
    assert len(seen) == 2  # the fixed-point scales and the auto gains, each once
    for x in seen:  # the first min(256, samples evaluated) calibration inputs, never the evaluated ones
        assert torch.equal(x, calib.inputs[0][:40])
    no_split = abfp.explore(TASK, formats=("abfp",), tile_widths=(32,), gains=(4,), auto_gain=False,
                            noise_stds=(0.0,), adc_bits=(6, 8), dac_search="none", runs=1, progress=False)
    assert no_split["calibration"] == "evaluated inputs"


def test_memo_counts_what_it_could_not_save():
    memo = EvalMemo()
    calls = []
    for _ in range(3):
        assert memo.lookup("gains", "k", lambda: calls.append(1) or {"a": 2.0}, "gains") == {"a": 2.0}
    assert calls == [1] and memo.forwards["gains"] == 1


@pytest.mark.parametrize("kw,match", [
    (dict(early_stop=0), "early stop"),
    (dict(early_stop=-1.0), "early stop"),
    (dict(early_stop=float("inf")), "early stop"),
    (dict(early_stop=True), "early stop"),
])
def test_bad_early_stop_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        abfp.explore(TASK, **{**NOISY, **kw})


def test_calibration_with_a_task_is_refused():
    with pytest.raises(ValueError, match="calibration only with a model"):
        abfp.explore(TASK, calibration=Dataset((torch.zeros(2, 64),), None))


@pytest.mark.slow  # explores a tiny model (seconds)
def test_no_bits_below_a_failing_first_guess_are_evaluated():
    """The metric is taken as monotone in the ADC bits: a gain that misses the target at the base
    ADC bits (8) is never tried with fewer."""
    res = abfp.explore(TASK, formats=("abfp",), tile_widths=(8, 32), gains=(0.25, 1, 4, 16), auto_gain=False,
                       noise_stds=(0.0,), adc_bits=(3, 12), dac_search="none", runs=1, progress=False)
    failing = [(d["tile_width"], d["gain"]) for d in res["designs"] if d["output_bits"] == 8 and not d["meets_target"]]
    assert failing  # G = 0.25 wastes the ADC range
    for n, g in failing:
        assert not [d for d in res["designs"] if (d["tile_width"], d["gain"]) == (n, g) and d["output_bits"] < 8]
