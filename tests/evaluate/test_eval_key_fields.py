"""Every field that reaches :func:`abfp.evaluate.evaluate` either keys its cached runs or cannot change them.

The test is generated from ``dataclasses.fields`` of :class:`EvalSettings`, :class:`ABFPConfig`
and :class:`ExecutionOptions` (and the keyword arguments of ``evaluate``): each one is perturbed in
turn, and the records of the perturbed evaluation served from a cache (and a memo) warmed by the
unperturbed one must equal those of a cold evaluation. A field added later without a perturbation
here fails ``test_every_field_has_a_perturbation``: decide then whether it decides results.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from abfp.config import ABFPConfig, ExecutionOptions
from abfp.evaluate import EvalSettings, evaluate
from abfp.evaluate.grid import Point
from abfp.evaluate.memo import EvalMemo
from abfp.zoo.base import KL, Dataset

sys.path.insert(0, str(Path(__file__).parent))
import tiny_task  # noqa: E402

#: One changed value per EvalSettings field (the base is :data:`BASE_SETTINGS`).
SETTINGS_PERTURB: dict[str, Any] = {
    "runs": 3,
    "batch_size": 16,
    "samples": 40,
    "seed": 5,
    "fixed_percentile": 99.0,
    "calibration_samples": 16,
    "calibration_count": 8,
    "autogain_threshold": 1e-2,
    "autogain_bits": (6, 6, 6),
    "layer_stats": False,
    "extra_metrics": (KL,),
}

#: EvalSettings fields that cannot change a result, so no perturbation is run; why:
SETTINGS_ALLOWED = {
    "progress": "a progress bar",
    "cache_path": "where the cache is (the thing under test)",
    "device": "the torch device type is in every key (cache_context); only 'cpu' exists on the test machine",
}

#: One changed value per device field (applied to every point's config).
CONFIG_PERTURB: dict[str, Any] = {
    "mode": "fixed",
    "tile_width": 16,
    "input_bits": 6,
    "weight_bits": 6,
    "output_bits": 6,
    "gain": 2.0,
    "noise_std": 0.6,
    "noise_dist": "gaussian",
    "scale_dtype": "pow2",
    "bf16_tile_outputs": True,
    "bf16_io": True,
    "recurrent_concat": True,
    "repeats": 2,
}
EXECUTION_PERTURB: dict[str, Any] = {"kernel": "reference", "seed": 11}

#: keyword arguments of evaluate besides model, data, metric, points and settings
KWARG_PERTURB = ("overrides", "calibration", "enough")
KWARG_ALLOWED = {"task_name": "a label in the records (not a cached value)", "memo": "the memo under test",
                 "settings": "perturbed field by field above", "kwargs": "EvalSettings fields, above"}

BASE_SETTINGS = dict(runs=2, batch_size=32, samples=64, seed=0, calibration_samples=32, progress=False)


def _points(change: dict[str, Any] | None = None, execution: dict[str, Any] | None = None) -> list[Point]:
    def cfg(**kw: Any) -> ABFPConfig:
        c = ABFPConfig(tile_width=8, gain=1.0, **kw)
        if change:
            c = c.replace(**change)
        if execution:
            c = c.with_execution(c.execution.replace(**execution))
        return c

    def point(c: ABFPConfig, auto_gain: bool = False) -> Point:
        return Point(c.mode, c, auto_gain=auto_gain)

    return [Point("fp32"),
            point(cfg(mode="fixed")),
            point(cfg(noise_std=0.0)),  # noise-free: its key holds no batch size or seed
            point(cfg()),
            point(cfg(), auto_gain=True)]


def _evaluate(points: list[Point], cache: Path | None, memo: EvalMemo | None = None, **kw: Any) -> list[dict[str, Any]]:
    t = tiny_task.make()
    settings = {**BASE_SETTINGS, **{k: v for k, v in kw.items() if k in EvalSettings.__dataclass_fields__}}
    extra = {k: v for k, v in kw.items() if k not in EvalSettings.__dataclass_fields__}
    return evaluate(t.build_model(), t.load_data(), KL, points, task_name="tiny", memo=memo,
                    settings=EvalSettings(cache_path=None if cache is None else str(cache), **settings), **extra)


def _comparable(records: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("seconds", *ignore)} for r in records]


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding every run of the unperturbed evaluation."""
    path = tmp_path_factory.mktemp("warm") / "runs.sqlite"
    _evaluate(_points(), path)
    return path


def _check(warm: Path, tmp_path: Path, points: list[Point], ignore: tuple[str, ...] = (),
           **kw: Any) -> list[dict[str, Any]]:
    cache = tmp_path / "runs.sqlite"
    shutil.copy(warm, cache)
    memo = EvalMemo()
    _evaluate(_points(), None, memo)  # the memo warmed by the unperturbed evaluation too
    served = _evaluate(points, cache, memo, **kw)
    cold = _evaluate(points, None, **kw)
    assert _comparable(served, ignore) == _comparable(cold, ignore)
    return cold


def _values(records: list[dict[str, Any]]) -> list[Any]:
    return [r["values"] for r in records if r["format"] != "fp32"]


@pytest.fixture(scope="module")
def base_values() -> list[Any]:
    return _values(_evaluate(_points(), None))


#: device fields that cannot change this model's numbers, and why
NO_EFFECT = {"recurrent_concat": "the tiny model has no recurrent layer"}


def test_every_field_has_a_perturbation():
    import inspect

    names = {f.name for f in dataclasses.fields(EvalSettings)}
    assert names == set(SETTINGS_PERTURB) | set(SETTINGS_ALLOWED), "a new EvalSettings field: perturb or allow it"
    cfg = {f.name for f in dataclasses.fields(ABFPConfig)} - {"execution"}
    assert cfg == set(CONFIG_PERTURB), "a new ABFPConfig field: add a perturbation"
    assert {f.name for f in dataclasses.fields(ExecutionOptions)} == set(EXECUTION_PERTURB)
    params = set(inspect.signature(evaluate).parameters) - {"model", "data", "metric", "points"}
    assert params == set(KWARG_PERTURB) | set(KWARG_ALLOWED), "a new evaluate() argument: perturb or allow it"


@pytest.mark.parametrize("name", sorted(SETTINGS_PERTURB))
def test_a_perturbed_setting_is_never_served_a_stale_run(name, warm, tmp_path):
    # the per-layer statistics of a record are measured on the first batch and say so (their
    # input_shape): a noise-free run served from another batch size keeps the batch it measured
    ignore = ("layers",) if name == "batch_size" else ()
    cold = _check(warm, tmp_path, _points(), ignore, **{name: SETTINGS_PERTURB[name]})
    if name in VALUES_CHANGE:  # honoured: the numbers move
        assert _values(cold) != _values(_evaluate(_points(), None)), name


#: settings that change the values of this grid (the others change other parts of a record:
#: extra metrics, layers; autogain_bits: auto gains follow saturation, which the bits barely move,
#: and this model gets the same gains at 6/6/6 as at 8/8/8)
VALUES_CHANGE = {"runs", "batch_size", "samples", "seed", "fixed_percentile", "calibration_samples",
                 "calibration_count", "autogain_threshold"}


@pytest.mark.parametrize("name", sorted(CONFIG_PERTURB))
def test_a_perturbed_device_field_is_never_served_a_stale_run_and_is_honoured(name, warm, tmp_path, base_values):
    cold = _check(warm, tmp_path, _points({name: CONFIG_PERTURB[name]}))
    # honoured: the field changes the numbers (every row's, but noise_std's noise-free row and the
    # fields a fixed-point row ignores: at least one row's)
    assert (_values(cold) == base_values) == (name in NO_EFFECT), name


@pytest.mark.parametrize("name", sorted(EXECUTION_PERTURB))
def test_a_perturbed_execution_option_is_never_served_a_stale_run_and_is_honoured(name, warm, tmp_path, base_values):
    cold = _check(warm, tmp_path, _points(execution={name: EXECUTION_PERTURB[name]}))
    assert _values(cold) != base_values, name


@pytest.mark.parametrize("name", KWARG_PERTURB)
def test_a_perturbed_evaluate_argument_is_never_served_a_stale_run(name, warm, tmp_path):
    g = torch.Generator().manual_seed(7)
    value = {"overrides": {"fc": ABFPConfig(tile_width=8, gain=4.0)},
             "calibration": Dataset((torch.randn(40, 4, 6, 6, generator=g) * 3,), None),
             "enough": lambda values, stderrs: True}[name]
    _check(warm, tmp_path, _points(), **{name: value})


def test_runs_cached_without_layer_statistics_are_measured_again_when_they_are_asked_for(tmp_path):
    """abfp explore caches its runs without per-layer statistics; abfp eval on the same cache
    then printed records whose ``layers`` were None."""
    cache = tmp_path / "runs.sqlite"
    _evaluate(_points(), cache, layer_stats=False)
    served = _evaluate(_points(), cache)
    assert all(r["layers"] for r in served if r["format"] != "fp32")
    assert _comparable(served) == _comparable(_evaluate(_points(), None))


def test_a_noise_free_point_with_noisy_overrides_runs_seeded_and_averaged():
    """A per-module override with device noise on a noise-free base point: the point ran once,
    unseeded (another number every call) and keyed without its batch size."""
    ov = {"fc": ABFPConfig(tile_width=8, gain=4.0)}
    pts = [Point("fp32"), Point("abfp", ABFPConfig(tile_width=8, gain=1.0, noise_std=0.0))]
    a, b = _evaluate(pts, None, overrides=ov), _evaluate(pts, None, overrides=ov)
    assert a[1]["runs"] == BASE_SETTINGS["runs"] and a[1]["values"] == b[1]["values"]


def test_a_point_whose_format_contradicts_its_configs_mode_is_refused():
    with pytest.raises(ValueError, match="mode 'fixed'"):
        Point("abfp", ABFPConfig(mode="fixed"))
    with pytest.raises(ValueError, match="format"):
        Point("float", ABFPConfig())
    with pytest.raises(ValueError, match="config exactly"):
        Point("fp32", ABFPConfig())


def test_a_noisy_record_says_the_seeds_and_batch_size_of_its_runs():
    """Two evaluations at --seed 0 and 5 gave records that differed only in their values."""
    recs = _evaluate(_points(), None, seed=5)
    noisy = [r for r in recs if r["format"] != "fp32" and r["noise_std"] > 0]
    assert noisy and all(r["seeds"] == [5, 6] and r["batch_size"] == 32 for r in noisy)
    quiet = [r for r in recs if r["format"] != "fp32" and r["noise_std"] == 0]
    assert quiet and all("seeds" not in r for r in quiet)
    own = _evaluate(_points(execution={"seed": 11}), None)  # a device with its own seed runs from it
    assert all(r["seeds"] == [11, 12] for r in own if r["format"] != "fp32" and r["noise_std"] > 0)
