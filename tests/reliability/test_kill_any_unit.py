"""A journaled or cached command killed at a random unit and resumed gives the uninterrupted run's
numbers, bit for bit, and computes again only what had not finished (at most the unit in flight).

Units: an ``abfp eval`` run (one pass of the model at one point and seed, cached as it ends), an
``abfp tune`` stage (journaled as it ends; the kill lands in any of its evaluations), an ``abfp
precision`` evaluation (journaled as it ends). The kill is a ``KeyboardInterrupt`` (what Ctrl-C
raises) at a unit drawn from a seeded generator, a few seeds per command.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "evaluate"))
sys.path.insert(0, str(HERE.parent / "precision"))
sys.path.insert(0, str(HERE.parent / "tune"))


class Counted:
    """``fn`` counting its calls, raising KeyboardInterrupt at call ``kill_at`` (1-based; None: never)."""

    def __init__(self, fn, kill_at: int | None = None) -> None:
        self.fn, self.kill_at, self.calls = fn, kill_at, 0

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt
        return self.fn(*a, **k)


def _unit(command: str, seed: int, low: int, high: int) -> int:
    """The unit killed: one of ``low..high``, drawn from a generator seeded by the command and ``seed``."""
    return random.Random(int.from_bytes(command.encode(), "big") * 1_000_003 + seed).randint(low, high)


# ------------------------------------------------------------------------------ eval
@pytest.mark.parametrize("seed", range(3))
def test_eval_killed_at_any_run_resumes_bit_identical(seed, tmp_path, monkeypatch):
    import tiny_task

    from abfp.config import ABFPConfig
    from abfp.evaluate import EvalSettings, build_grid, evaluate, runner
    from abfp.evaluate.cache import RunCache

    points = build_grid(tile_widths=(8, 32), gains=(1.0, 4.0), noise_stds=(0.5,),
                        base=ABFPConfig(), fixed=True)
    cache = tmp_path / "runs.sqlite"

    def run(cache_path):
        t = tiny_task.make()
        return evaluate(t.build_model(), t.load_data(), t.metric, points, task_name="tiny",
                        settings=EvalSettings(progress=False, batch_size=32, runs=2, cache_path=cache_path))

    real = runner.run_all
    count = Counted(real)
    monkeypatch.setattr(runner, "run_all", count)
    whole = run(None)
    total = count.calls  # the float32 pass and every device run
    j = _unit("eval", seed, 2, total)
    monkeypatch.setattr(runner, "run_all", Counted(real, kill_at=j))
    with pytest.raises(KeyboardInterrupt):
        run(str(cache))
    with RunCache(cache) as c:
        assert len(c) == j - 2  # every device run that finished before the kill, nothing else
    resumed_count = Counted(real)
    monkeypatch.setattr(runner, "run_all", resumed_count)
    resumed = run(str(cache))
    assert [r["values"] for r in resumed] == [r["values"] for r in whole]
    assert resumed_count.calls == 1 + total - (j - 1)  # float32, then the run in flight and the ones after it


# ------------------------------------------------------------------------------ tune
@pytest.mark.parametrize("seed", range(3))
def test_tune_killed_in_any_stage_resumes_bit_identical(seed, tmp_path, monkeypatch):
    from test_tune_journal import _run, _summary

    import abfp.tune.api as api
    from abfp.tune.journal import TuneJournal

    real = api.plan_outputs
    count = Counted(real)
    monkeypatch.setattr(api, "plan_outputs", count)
    put_at: list[tuple[str, int]] = []  # each stage and the evaluations made when it was journaled
    real_put = TuneJournal.put

    def put(self, name, record):
        put_at.append((name, count.calls))
        return real_put(self, name, record)

    monkeypatch.setattr(TuneJournal, "put", put)
    whole = _summary(_run(journal=tmp_path / "whole.json"))
    total = count.calls
    j = _unit("tune", seed, 1, total)
    journal = tmp_path / "j.json"
    monkeypatch.setattr(api, "plan_outputs", Counted(real, kill_at=j))
    with pytest.raises(KeyboardInterrupt):
        _run(journal=journal)
    finished = [(name, n) for name, n in put_at if n < j]
    assert set(json.loads(journal.read_text())["records"]) == {name for name, _ in finished}
    resumed_count = Counted(real)
    monkeypatch.setattr(api, "plan_outputs", resumed_count)
    assert _summary(_run(journal=journal, resume=True)) == whole
    done = finished[-1][1] if finished else 0
    assert resumed_count.calls == total - done  # the finished stages' evaluations are not made again


# ------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("seed", range(3))
def test_precision_killed_at_any_evaluation_resumes_bit_identical(seed, tmp_path, monkeypatch):
    import tiny_precision_task
    from test_precision_journal import SETTINGS, _numbers

    import abfp.precision.experiment as experiment
    from abfp.precision import PrecisionSettings, run_precision

    real = experiment.run_model
    count = Counted(real)
    monkeypatch.setattr(experiment, "run_model", count)
    task = tiny_precision_task.make()
    whole = run_precision(task, PrecisionSettings(**SETTINGS))
    total = count.calls  # the float32 reference, then one call per journaled evaluation
    j = _unit("precision", seed, 2, total)
    journal = tmp_path / "p.journal.json"
    monkeypatch.setattr(experiment, "run_model", Counted(real, kill_at=j))
    with pytest.raises(KeyboardInterrupt):
        run_precision(task, PrecisionSettings(**SETTINGS), journal=journal)
    kept = json.loads(journal.read_text())["records"]
    evaluations = [k for k in kept if k != "learned"]
    assert len(evaluations) == j - 2  # every evaluation finished before the kill
    resumed_count = Counted(real)
    monkeypatch.setattr(experiment, "run_model", resumed_count)
    resumed = run_precision(task, PrecisionSettings(**SETTINGS), journal=journal, resume=True)
    assert _numbers(resumed) == _numbers(whole)
    assert resumed_count.calls == 1 + total - (j - 1)


# ------------------------------------------------------------------------------ explore
@pytest.mark.parametrize("seed", range(2))
def test_explore_killed_at_any_run_resumes_bit_identical(seed, tmp_path, monkeypatch):
    import abfp
    from abfp.evaluate import runner
    from abfp.nn import is_converted

    task = str(HERE.parent / "explore" / "explore_tiny_task.py") + ":make"
    kw = dict(formats=("fixed", "abfp"), tile_widths=(8,), gains=(4,), auto_gain=False, adc_bits=(3, 8),
              dac_search="none", noise_stds=(0.2887,), runs=2, progress=False)
    real = runner.run_all

    def device_runs(kill_at=None):
        count = Counted(real, kill_at)

        def run_all(model, *a, **k):  # count (and kill) the device runs only, the units the cache keeps
            return count(model, *a, **k) if is_converted(model) else real(model, *a, **k)

        monkeypatch.setattr(runner, "run_all", run_all)
        return count

    count = device_runs()
    whole = abfp.explore(task, **kw)
    total = count.calls
    j = _unit("explore", seed, 1, total)
    cache = str(tmp_path / "runs.sqlite")
    device_runs(kill_at=j)
    with pytest.raises(KeyboardInterrupt):
        abfp.explore(task, cache_path=cache, **kw)
    resumed_count = device_runs()
    resumed = abfp.explore(task, cache_path=cache, **kw)
    assert resumed_count.calls == total - (j - 1)  # the run in flight and those after it
    def numbers(result):  # every design and the cheapest per family, without their timings
        strip = lambda d: None if d is None else {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
        return [strip(d) for d in result["designs"]], {f: strip(d) for f, d in result["cheapest"].items()}

    assert numbers(resumed) == numbers(whole)
