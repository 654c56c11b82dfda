"""Step 6 of the energy rule, the refinement on the real metric (:mod:`abfp.tune.refine`):
against a brute force over the neighbourhoods, within the energy limit, never worse than its start,
and through ``abfp.tune(refine=N)`` / ``abfp tune --refine N``."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import abfp
from abfp import ABFPConfig
from abfp.tune import power_of_two_gains
from abfp.tune.refine import refine_settings

GAINS = [1.0, 2.0, 4.0, 8.0, 16.0]
REPS = [1, 2, 4]


def _energy(st_: dict) -> float:
    return sum(g * k for g, k in st_.values())


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.tuples(st.sampled_from(GAINS), st.sampled_from(REPS)),
                       min_size=1, max_size=3),
       st.integers(0, 2**31 - 1), st.floats(0.5, 3.0), st.booleans())
def test_refine_matches_a_brute_force_module_by_module(start: dict, salt: int, slack: float, higher: bool) -> None:
    score = _random_score(salt)
    limit = _energy(start) * slack
    modules = sorted(start)
    r = refine_settings(start, modules, GAINS, REPS, _energy, limit, score, score(dict(start)), higher)
    # brute force: each module in turn, the best neighbour (one gain step, any repeats) within the limit
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    cur, best, n = dict(start), score(dict(start)), 0
    for m in modules:
        at = GAINS.index(cur[m][0])
        pick = None
        for g, k in itertools.product(GAINS[max(0, at - 1): at + 2], REPS):
            trial = {**cur, m: (g, k)}
            if (g, k) == cur[m] or _energy(trial) > limit:
                continue
            n += 1
            v = score(trial)
            if better(v, best):
                pick, best = (g, k), v
        if pick:
            cur[m] = pick
    assert r.settings == cur and r.metric == best and len(r.trials) == n
    assert _energy(r.settings) <= max(limit, _energy(start))
    assert not better(score(dict(start)), r.metric)  # never worse than the start
    for m, (a, b) in r.moved(start).items():
        assert a == start[m] and b == r.settings[m] != a


def test_refine_bad_arguments() -> None:
    with pytest.raises(KeyError, match="'z'"):
        refine_settings({"a": (1.0, 1)}, ["z"], GAINS, REPS, _energy, 10.0, lambda s: 0.0, 0.0, True)
    with pytest.raises(ValueError, match="width"):
        refine_settings({"a": (1.0, 1)}, ["a"], GAINS, REPS, _energy, 10.0, lambda s: 0.0, 0.0, True, width=0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6))


def test_tune_refine_is_never_worse_on_calibration_and_stays_within_the_budget() -> None:
    model = _mlp()
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    kw = dict(target=0.9999, gain_rule="energy", gains=power_of_two_gains(64, 2), max_repeats=2, energy_budget=1.3)
    plain = abfp.tune(model, x, ABFPConfig(tile_width=8), **kw)
    ref = abfp.tune(model, x, ABFPConfig(tile_width=8), refine=2, **kw)
    assert plain.details["refine"] is None
    r = ref.details["refine"]
    assert len(r["modules"]) == 2 and r["trials"]
    assert all(len(t) == 4 for t in r["trials"])
    # eval inputs are the calibration inputs here, scored with the same seed as the trials
    assert ref.stages[1].metric >= plain.stages[1].metric
    assert ref.details["allocation"]["energy_ratio"] <= 1.3 * (1 + 1e-9)
    assert "refined on calibration" in ref.stages[1].note
    for m, (a, b) in r["moved"].items():
        assert b == ref.details["settings"][m] and [ref.plan.modules[m].gain, ref.plan.modules[m].repeats] == b
    # the refined modules are the rule's riskiest: largest predicted loss at the chosen settings
    sens, err = plain.details["sensitivity"], plain.details["error_sq"]
    chosen = plain.details["settings"]
    loss = {m: sens[m] * err[m][f"{chosen[m][0]:g}x{chosen[m][1]}"] for m in err}
    assert r["modules"] == sorted(loss, key=lambda m: -loss[m])[:2]


@pytest.mark.parametrize("kwargs, msg", [({"refine": -1}, "refine"), ({"refine": 1}, "gain_rule='energy'"),
                                         ({"refine": True, "gain_rule": "energy"}, "refine")])
def test_tune_refine_bad_options(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        abfp.tune(_mlp(), torch.randn(8, 24), ABFPConfig(), **kwargs)


def _random_score(salt: int):
    table: dict = {}

    def score(st_: dict) -> float:
        key = tuple(sorted(st_.items()))
        if key not in table:
            table[key] = float(torch.rand(1, generator=torch.Generator().manual_seed(hash((key, salt)) % 2**31)))
        return table[key]
    return score


def _neighbours(cur: dict, m: str, limit: float):
    """Every plan one move of ``m`` away (one gain step either way, any repeats) within ``limit``."""
    at = GAINS.index(cur[m][0])
    for g, k in itertools.product(GAINS[max(0, at - 1): at + 2], REPS):
        trial = {**cur, m: (g, k)}
        if (g, k) != cur[m] and _energy(trial) <= limit:
            yield (g, k), trial


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.tuples(st.sampled_from(GAINS), st.sampled_from(REPS)),
                       min_size=1, max_size=4),
       st.integers(0, 2**31 - 1), st.floats(0.5, 3.0), st.booleans(), st.sampled_from([1, 2, 3, None]),
       st.sampled_from([0.0, 0.05, 0.3]))
def test_refine_passes_match_a_brute_force_of_repeated_passes(start: dict, salt: int, slack: float, higher: bool,
                                                               passes: int | None, margin: float) -> None:
    score = _random_score(salt)
    limit = _energy(start) * slack
    modules = sorted(start)
    r = refine_settings(start, modules, GAINS, REPS, _energy, limit, score, score(dict(start)), higher, passes=passes,
                        margin=margin)
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    # by more than the margin: above (1 + margin) times / below (1 - margin) times the plan's (positive) score
    clears = (lambda a, b: a > b * (1 + margin)) if higher else (lambda a, b: a < b * (1 - margin))
    # brute force: whole passes, each module to its best neighbour when that clears the margin; stop after a
    # pass with no move or at the cap
    cur, best, done, seen = dict(start), score(dict(start)), 0, {tuple(sorted(start.items()))}
    while passes is None or done < passes:
        done += 1
        any_move = False
        for m in modules:
            scores = {s: score(trial) for s, trial in _neighbours(cur, m, limit)}
            seen.update(tuple(sorted({**cur, m: s}.items())) for s in scores)
            if scores:
                pick = (max if higher else min)(scores, key=lambda s: scores[s])
                if clears(scores[pick], best):
                    cur[m], best, any_move = pick, scores[pick], True
        if not any_move:
            break
    assert r.settings == cur and r.metric == best and r.passes == done
    # each plan scored once (the start not at all), and only plans the brute force looked at
    assert len(r.trials) == len(seen) - 1
    assert _energy(r.settings) <= max(limit, _energy(start))
    assert not better(score(dict(start)), r.metric)
    if passes is None:  # run until nothing moves: a local optimum over every listed module's neighbourhood
        for m in modules:
            assert not any(clears(score(trial), r.metric) for _, trial in _neighbours(r.settings, m, limit))


def test_refine_passes_second_pass_takes_what_the_first_freed() -> None:
    # a's better setting (4, 2) costs 8 and fits only after b has given up a repeat (b is refined after a)
    start = {"a": (4.0, 1), "b": (4.0, 2)}
    table = {(("a", (4.0, 1)), ("b", (4.0, 2))): 1.0, (("a", (4.0, 1)), ("b", (4.0, 1))): 0.9,
             (("a", (4.0, 2)), ("b", (4.0, 1))): 0.5}

    def score(st_: dict) -> float:
        return table.get(tuple(sorted(st_.items())), 2.0)

    one = refine_settings(start, ["a", "b"], GAINS, REPS, _energy, 12.0, score, 1.0, False)
    assert one.settings == {"a": (4.0, 1), "b": (4.0, 1)} and one.metric == 0.9 and one.passes == 1
    more = refine_settings(start, ["a", "b"], GAINS, REPS, _energy, 12.0, score, 1.0, False, passes=None)
    assert more.settings == {"a": (4.0, 2), "b": (4.0, 1)} and more.metric == 0.5 and more.passes == 3
    with pytest.raises(ValueError, match="passes"):
        refine_settings(start, ["a"], GAINS, REPS, _energy, 12.0, score, 1.0, False, passes=0)
    # a margin of 15 % keeps b where it was (0.9 is 10 % better than 1.0), and so a's move never fits
    kept = refine_settings(start, ["a", "b"], GAINS, REPS, _energy, 12.0, score, 1.0, False, passes=None, margin=0.15)
    assert kept.settings == start and kept.metric == 1.0 and kept.passes == 1
    for bad in (-0.1, 1.0, True, float("nan")):
        with pytest.raises(ValueError, match="margin"):
            refine_settings(start, ["a"], GAINS, REPS, _energy, 12.0, score, 1.0, False, margin=bad)


def test_tune_refine_passes_and_fill() -> None:
    model = _mlp()
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    kw = dict(target=0.9999, gain_rule="energy", gains=power_of_two_gains(64, 2), max_repeats=2, energy_budget=1.3,
              refine=3)
    one = abfp.tune(model, x, ABFPConfig(tile_width=8), **kw)
    more = abfp.tune(model, x, ABFPConfig(tile_width=8), refine_passes=None, refine_fill=True, **kw)
    r1, r = one.details["refine"], more.details["refine"]
    assert r1["passes"] == 1 and "fill" not in r1 and r["passes"] >= 1
    # the first pass is the same, the later ones and the fill only improve it on calibration
    assert r["trials"][:len(r1["trials"])] == r1["trials"]
    assert more.stages[1].metric >= one.stages[1].metric
    assert more.details["allocation"]["energy_ratio"] <= 1.3 * (1 + 1e-9)
    fill = r["fill"]
    assert set(fill) == {"moved", "metric", "kept"}
    assert not fill["kept"] or (fill["metric"] is not None and fill["metric"] == more.details["allocation"]["metric"])
    note = more.stages[1].note
    assert f"({r['passes']} pass" in note and "fill" in note


@pytest.mark.parametrize("kwargs, err, msg", [
    ({"gain_rule": "energy", "refine": 1, "refine_passes": 0}, ValueError, "refine_passes"),
    ({"gain_rule": "energy", "refine": 1, "refine_passes": True}, ValueError, "refine_passes"),
    ({"gain_rule": "energy", "refine_passes": 2}, ValueError, "go with refine"),
    ({"gain_rule": "energy", "refine_fill": True}, ValueError, "go with refine"),
    ({"gain_rule": "energy", "refine_margin": 0.01}, ValueError, "go with refine"),
    ({"gain_rule": "energy", "refine": 1, "refine_margin": 1.0}, ValueError, "refine_margin"),
    ({"gain_rule": "energy", "refine": 1, "refine_fill": 1}, TypeError, "refine_fill"),
])
def test_tune_refine_passes_bad_options(kwargs: dict, err: type, msg: str) -> None:
    with pytest.raises(err, match=msg):
        abfp.tune(_mlp(), torch.randn(8, 24), ABFPConfig(), **kwargs)
