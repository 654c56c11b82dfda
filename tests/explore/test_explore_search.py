"""The explorer on a tiny user task: JSON schema, bisection thresholds, cheapest designs, energy
against abfp.energy.account, caching and resume after a kill."""

import json
import math
from pathlib import Path

import pytest

import abfp
from abfp import ABFPConfig
from abfp.energy import EnergyParams, account
from abfp.evaluate import runner
from abfp.explore.report import DESIGN_KEYS, RESULT_KEYS, validate_explore
from abfp.nn import is_converted

TASK = str(Path(__file__).with_name("explore_tiny_task.py")) + ":make"
REAL_RUN_ALL = runner.run_all
SMALL = dict(formats=("fixed", "abfp"), tile_widths=(8, 32), gains=(1, 4), auto_gain=False, noise_stds=(0.0,),
             adc_bits=(3, 10), runs=1, progress=False)


@pytest.fixture(scope="module")
def result():
    return abfp.explore(TASK, **SMALL)


@pytest.mark.slow  # explores a tiny model (seconds)
def test_result_has_the_issue_schema(result):
    for k in RESULT_KEYS:
        assert k in result
    assert result["metric"] == "top-1 accuracy"
    assert result["fp32"] == pytest.approx(100.0)
    assert result["target"] == pytest.approx(99.0)  # 1 % (relative) from float32
    assert set(result["energy_params"]) == set(EnergyParams().to_dict())
    for d in result["designs"]:
        for k in DESIGN_KEYS:
            assert k in d, k
        assert d["gain"] == "auto" or isinstance(d["gain"], float)
        assert d["meets_target"] == (d["value"] >= result["target"])
    assert set(result["cheapest"]) == {"fixed-n8", "fixed-n32", "abfp-n8", "abfp-n32"}
    validate_explore(json.loads(json.dumps(result)))  # JSON round trip


@pytest.mark.slow  # explores a tiny model (seconds)
def test_cheapest_is_the_least_energy_design_meeting_the_target(result):
    for fam, best in result["cheapest"].items():
        ok = [d for d in result["designs"] if d["family"] == fam and d["meets_target"]]
        if not ok:
            assert best is None
            continue
        assert best["meets_target"]
        assert best["energy_pj_per_inference"] == min(d["energy_pj_per_inference"] for d in ok)


@pytest.mark.slow  # explores a tiny model (seconds)
def test_min_adc_bits_is_a_true_threshold(result):
    """For each family's fewest ADC bits b*, the same design one bit lower was evaluated and failed."""
    lo = SMALL["adc_bits"][0]
    for fam, b in result["min_adc_bits"].items():
        if b is None or b == lo:
            continue
        ds = [d for d in result["designs"] if d["family"] == fam and d["input_bits"] == 8 and d["weight_bits"] == 8]
        at_b = [d for d in ds if d["output_bits"] == b and d["meets_target"]]
        assert at_b
        for d in at_b:
            below = [e for e in ds if e["gain"] == d["gain"] and e["output_bits"] == b - 1]
            assert below and not below[0]["meets_target"], (fam, b, d["gain"])


@pytest.mark.slow  # explores a tiny model (seconds)
def test_energy_matches_abfp_energy_account(result):
    """Every design's energy per inference is what abfp.energy.account gives for that device."""
    from explore_tiny_task import make  # noqa: PLC0415  (the test folder is on sys.path)

    task = make()
    x = task.load_data().inputs[0][:1]
    for d in result["designs"][:6]:
        cfg = ABFPConfig(mode=d["format"], tile_width=d["tile_width"], input_bits=d["input_bits"],
                         weight_bits=d["weight_bits"], output_bits=d["output_bits"], gain=d["gain"],
                         noise_std=0.0)
        t = account(task.build_model(), x, cfg).totals()
        assert d["energy_pj_per_inference"] == pytest.approx(t["energy_total"], rel=1e-12)
        assert d["adc_energy_pj_per_inference"] == pytest.approx(t["energy_adc"], rel=1e-12)


@pytest.mark.slow  # explores a tiny model (seconds)
def test_pareto_flags_and_frontier(result):
    front = [d for d in result["designs"] if d["pareto"]]
    assert front
    for d in front:  # nothing is cheaper and at least as good
        assert not any(e["energy_pj_per_inference"] < d["energy_pj_per_inference"] and e["value"] >= d["value"]
                       for e in result["designs"])


def _counting(monkeypatch, fail_after=None):
    """Count analog forward passes (the work the cache saves); optionally 'kill' the run after some."""
    count = {"analog": 0}
    real = REAL_RUN_ALL

    def run_all(model, *a, **k):
        if is_converted(model):
            if fail_after is not None and count["analog"] >= fail_after:
                raise KeyboardInterrupt
            count["analog"] += 1
        return real(model, *a, **k)

    monkeypatch.setattr(runner, "run_all", run_all)
    return count


@pytest.mark.slow  # explores a tiny model (seconds)
def test_cache_makes_a_rerun_free_and_resumes_a_killed_run(tmp_path, monkeypatch):
    kw = dict(SMALL, formats=("abfp",), tile_widths=(8,), gains=(4,), adc_bits=(3, 8), dac_search="none",
              noise_stds=(0.2887,), runs=2)
    fresh = _counting(monkeypatch)
    ref = abfp.explore(TASK, **kw)
    total = fresh["analog"]
    assert total == 2 * ref["evaluations"]  # two runs per noisy design

    cache = str(tmp_path / "runs.sqlite")
    killed = _counting(monkeypatch, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        abfp.explore(TASK, cache_path=cache, **kw)
    assert killed["analog"] == 3
    resumed = _counting(monkeypatch)
    res = abfp.explore(TASK, cache_path=cache, **kw)
    assert resumed["analog"] == total - 3  # the three finished runs came from the cache
    again = _counting(monkeypatch)
    res2 = abfp.explore(TASK, cache_path=cache, **kw)
    assert again["analog"] == 0
    for a, b, c in zip(ref["designs"], res["designs"], res2["designs"]):
        assert a["value"] == b["value"] == c["value"] and a["std"] == b["std"]
        assert a["runs"] == 2 and math.isfinite(a["std"])


@pytest.mark.slow  # explores a tiny model (seconds)
def test_auto_gain_family_prices_its_per_layer_gains():
    res = abfp.explore(TASK, formats=("abfp",), tile_widths=(32,), gains=(), auto_gain=True, noise_stds=(0.0,),
                       adc_bits=(5, 7), dac_search="none", runs=1, progress=False)
    assert list(res["cheapest"]) == ["abfp-n32-auto"]
    for d in res["designs"]:
        assert d["gain"] == "auto" and set(d["gains"]) == {"fc1", "fc2"}
        # the analog energy is each layer's MACs times its own gain (abfp.energy's count)
        macs = {"fc1": 64 * 32, "fc2": 32 * 6}
        analog = sum(macs[m] * EnergyParams().analog_mac * g for m, g in d["gains"].items())
        assert d["energy_by_kind_pj"]["analog"] == pytest.approx(analog, rel=1e-12)


@pytest.mark.slow  # explores a tiny model (seconds)
@pytest.mark.parametrize("n_calib,expected", [(5, 5), (1000, 48)])
def test_auto_gains_and_fixed_scales_use_calibration_samples_inputs(monkeypatch, n_calib, expected):
    """``calibration_samples``: auto gain and fixed-point calibration see min(N, samples) inputs (here
    the evaluated ones: the tiny task has no calibration split), and the JSON says how many."""
    from abfp.evaluate import autogain

    seen: list[int] = []
    real = autogain.choose_gains

    def spy(m, inputs, *a, **k):
        seen.append(int(inputs[0].shape[0]))
        return real(m, inputs, *a, **k)

    monkeypatch.setattr(runner, "choose_gains", spy)
    res = abfp.explore(TASK, formats=("abfp",), tile_widths=(32,), gains=(), auto_gain=True, noise_stds=(0.0,),
                       adc_bits=(5, 6), dac_search="none", runs=1, progress=False, calibration_samples=n_calib)
    assert seen and set(seen) == {expected}
    assert res["calibration_samples"] == expected


@pytest.mark.parametrize("kw,match", [
    (dict(calibration_samples=0), "calibration_samples"),
    (dict(target_drop=150.0), "target drop"),
    (dict(target_drop=float("nan")), "finite"),
    (dict(tile_widths=(0,)), "tile widths"),
    (dict(gains=(-1,)), "gains"),
    (dict(adc_bits=(1, 8)), "ADC bits"),
    (dict(adc_bits=(9, 8)), "ADC bits"),
    (dict(adc_bits=(2.5, 8)), "ADC bits"),
    (dict(dac_search="both"), "DAC search"),
    (dict(formats=("float",)), "formats"),
    (dict(noise_stds=(-0.1,)), "noise"),
    (dict(runs=0), "runs"),
])
def test_bad_arguments_are_one_line_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        abfp.explore(TASK, **{**SMALL, **kw})


def test_bad_task_is_refused():
    with pytest.raises(TypeError, match="task must be"):
        abfp.explore(3.5)
    with pytest.raises(ValueError, match="data and metric"):
        abfp.explore(ABFPConfig and __import__("torch").nn.Linear(2, 2))


def test_a_design_that_makes_the_outputs_nan_fails_named_instead_of_stopping_the_search():
    """sqrt of an exact float32 zero: the device's noise makes it negative, the output NaN. The
    evaluation refuses NaN outputs (an arg-max metric would score them as a class); the explorer
    records that design as failing with the reason, and the search goes on."""
    import math

    import torch
    from torch import nn

    import abfp
    from abfp.zoo.base import AGREEMENT, Dataset

    class SqrtHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2, bias=False)
            with torch.no_grad():
                self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))

        def forward(self, x):
            return torch.sqrt(self.fc(x))

    x = torch.tensor([[1.0, 1.0]] + [[1.5, 1.1]] * 7)
    res = abfp.explore(SqrtHead().eval(), Dataset((x,)), AGREEMENT, formats=("abfp",), tile_widths=(8,), gains=(1,),
                       auto_gain=False, adc_bits=(2, 4), noise_stds=(2.0,), runs=1, dac_search="none", progress=False)
    failed = [d for d in res["designs"] if "failed" in d]
    assert failed and all(math.isnan(d["value"]) and not d["meets_target"] for d in failed)
    assert "is NaN" in failed[0]["failed"] and "on the device" in failed[0]["failed"]
