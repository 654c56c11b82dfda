"""The energy rule (abfp.tune.allocate): errors against a float64 evaluation of SPEC 1, the
knapsack path against brute force, the bisection, sensitivities, and ``tune(gain_rule="energy")``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import abfp
from abfp import ABFPConfig
from abfp.tune import power_of_two_gains
from abfp.tune.allocate import (allocation_path, energy_allocation, fill_budget, profile_layers, repeat_options, search_path,
                                sensitivities)
from abfp.zoo.base import COSINE

from test_tune_gains_repeats import oracle_linear


def test_profile_errors_match_the_float64_device() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 70, generator=g) * torch.rand(48, 1, generator=g)
    layer = nn.Linear(70, 9, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(9, 70, generator=g))
    w = layer.weight.detach()
    cfg = ABFPConfig(tile_width=32, gain=1.0, scale_dtype="float32")  # noise one bin wide
    cands = [1.0, 3.0, 8.0, 20.0]
    prof = profile_layers(nn.Sequential(layer), x, cfg, cands)
    quiet = profile_layers(nn.Sequential(layer), x, cfg.replace(noise_std=0.0), cands)
    ref = x.double() @ w.double().T
    # uniform noise of +-0.5 LSB moves a rounded code by at most one: |noisy - clean| <= sum_t LSB_t
    xp = torch.nn.functional.pad(x.double(), (0, 26)).view(48, 3, 32).abs().amax(-1)
    wp = torch.nn.functional.pad(w.double(), (0, 26)).view(9, 3, 32).abs().amax(-1)
    lsb_sum = (xp[:, None, :] * wp[None, :, :]).sum(-1)  # times n / (G L) below
    for c in cands:
        want = float(((oracle_linear(x, w, 32, c) - ref) ** 2).sum() / (ref**2).sum())
        assert prof.quant["0"][c] == pytest.approx(want, rel=1e-5)
        assert quiet.quant["0"][c] == pytest.approx(want, rel=1e-5) and quiet.noise["0"][c] == 0.0
        bound = float(((lsb_sum * 32 / (c * 127)) ** 2).sum() / (ref**2).sum())
        assert 0.0 < prof.noise["0"][c] <= bound
        assert prof.error_sq("0", (c, 4)) == pytest.approx(prof.quant["0"][c] + prof.noise["0"][c] / 4)
    assert prof.best["0"] in cands


def _brute(losses, energies):
    mods = sorted(losses)
    for combo in itertools.product(*(sorted(losses[m]) for m in mods)):
        yield (sum(energies[m][s] for m, s in zip(mods, combo)), sum(losses[m][s] for m, s in zip(mods, combo)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def _knapsack(seed: int, modules: str, jitter: float):
    """Random predicted losses and energies of ``modules`` over gains 1-8 and repeats 1-2."""
    g = torch.Generator().manual_seed(seed)
    settings = [(float(G), k) for G in (1, 2, 4, 8) for k in (1, 2)]
    losses, energies = {}, {}
    for m in modules:
        a, b = float(torch.rand(1, generator=g)) + 0.1, float(torch.rand(1, generator=g)) + 0.1
        q = float(torch.rand(1, generator=g)) * 3
        losses[m] = {(G, k): q / G**2 + b / (k * G**2) + jitter * float(torch.rand(1, generator=g))
                     for G, k in settings}
        energies[m] = {(G, k): k * (a * G + b) for G, k in settings}
    return settings, losses, energies


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_path_plans_are_optimal_for_their_energy(seed: int) -> None:
    settings, losses, energies = _knapsack(seed, "abc", 0.01)
    path = allocation_path(losses, energies)
    cost = [sum(energies[m][p[m]] for m in p) for p in path]
    loss = [sum(losses[m][p[m]] for m in p) for p in path]
    assert all(e2 >= e1 for e1, e2 in zip(cost, cost[1:]))
    assert all(l2 < l1 for l1, l2 in zip(loss, loss[1:]))
    every = list(_brute(losses, energies))
    assert cost[0] == pytest.approx(min(e for e, _ in every))
    assert loss[-1] == pytest.approx(min(v for _, v in every))
    for e, v in zip(cost, loss):  # a Lagrangian solution: nothing as cheap has less loss
        assert all(lv >= v - 1e-12 for le, lv in every if le <= e + 1e-12)



@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fill_budget_spends_what_the_path_plan_leaves(seed: int) -> None:
    settings, losses, energies = _knapsack(seed, "abcd", 0.0)
    path = allocation_path(losses, energies)
    cost = [sum(energies[m][p[m]] for m in p) for p in path]
    hulls = {m: [s for s in settings if any(p[m] == s for p in path)] for m in losses}  # each module's moves
    filled_any = False
    for i in range(len(path) - 1):
        limit = cost[i] + 0.999 * (cost[i + 1] - cost[i])  # path plan i fits, i + 1 does not
        st = fill_budget(path[i], losses, energies, limit)
        e = sum(energies[m][st[m]] for m in st)
        assert e <= limit + 1e-12
        assert sum(losses[m][st[m]] for m in st) <= sum(losses[m][path[i][m]] for m in st) + 1e-12
        for m in st:  # every module on a path setting, none below the path plan's, and no next move fits
            assert st[m] in hulls[m] and energies[m][st[m]] >= energies[m][path[i][m]]
            nxt = [s for s in hulls[m] if energies[m][s] > energies[m][st[m]]]
            if nxt:
                step = min(energies[m][s] for s in nxt) - energies[m][st[m]]
                assert e + step > limit
        filled_any |= st != path[i]
    assert filled_any  # the test exercises the fill


def test_search_path_finds_the_first_plan_that_meets() -> None:
    path = [{"m": (float(i), 1)} for i in range(20)]
    calls = []

    def score(st):
        calls.append(st["m"][0])
        return st["m"][0] / 19.0

    found = search_path(path, score, lambda v: v >= 0.5)
    assert found.reached and found.index == 10 and found.settings == {"m": (10.0, 1)}
    assert len(calls) <= 7
    miss = search_path(path, score, lambda v: v >= 2.0)
    assert not miss.reached and miss.index == 19
    first = search_path(path, score, lambda v: v >= -1.0)
    assert first.index == 0
    with pytest.raises(ValueError, match="empty"):
        search_path([], score, lambda v: True)


def test_sensitivity_of_cosine_to_relative_noise() -> None:
    # 1 - cos(y, y + e) ~ |e|^2 / (2 |y|^2) for a small e mostly orthogonal to y: s ~ 1/2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512))
    x = torch.randn(32, 64)
    ref = model(x)
    s = sensitivities(model, (x,), ABFPConfig(), {"0": 0.05}, lambda y: 1.0 - COSINE(y, None, ref))
    assert 0.4 < s["0"] < 0.6


def test_sensitivity_of_a_metric_that_does_not_move() -> None:
    # top-1 on well-separated logits does not change under a 1 % perturbation; the module that
    # changes the outputs still gets a positive sensitivity (its output error, scaled), the
    # module whose output is unused gets none
    torch.manual_seed(0)

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(16, 4), nn.Linear(16, 4)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    model = TwoHeads()
    x = torch.randn(32, 16) * 10
    ref = model(x)
    top1 = lambda y: float((y.argmax(-1) != ref.argmax(-1)).double().mean())  # noqa: E731
    delta = 0.01
    s = sensitivities(model, (x,), ABFPConfig(), {"used": delta, "unused": delta}, top1)
    assert top1(ref) == 0.0 and s["unused"] == 0.0
    # Gaussian noise of relative size delta on the only product: |y - ref|^2 / |ref|^2 ~ delta^2
    assert 0.5 < s["used"] < 2.0


def test_energy_rule_never_returns_a_plan_worse_than_the_base() -> None:
    # a score under which only the base config (every module at G = 8, k = 1) is any good: the
    # path's plans miss the target, so the rule keeps the base config and says so
    model = _mlp()
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(2))
    cfg = ABFPConfig(tile_width=8)
    mods = ["0", "2", "4"]
    base = {m: (8.0, 1) for m in mods}
    settings, details = energy_allocation(model, (x,), None, cfg, COSINE, [1.0, 2.0, 4.0], [1], mods, (x[:4],),
                                          lambda st: 0.9 if st == base else 0.1, lambda v: v >= 0.99)
    assert settings == base
    al = details["allocation"]
    assert al["base_plan"] and not al["reached"] and al["metric"] == 0.9 and al["energy_ratio"] == 1.0


def test_gain_grids_and_repeat_options() -> None:
    assert power_of_two_gains(8) == [1.0, 2.0, 4.0, 8.0]
    half = power_of_two_gains(8, per_octave=2)
    assert len(half) == 7 and half[1] == pytest.approx(math.sqrt(2)) and half[-1] == pytest.approx(8.0)
    assert repeat_options(10) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="per octave"):
        power_of_two_gains(8, per_octave=0)
    with pytest.raises(ValueError, match="max_repeats"):
        repeat_options(0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6))


def test_tune_energy_rule_reaches_the_target_at_less_energy_than_the_error_rule() -> None:
    model = _mlp()
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    cfg = ABFPConfig(tile_width=8)
    err = abfp.tune(model, x, cfg, target=0.999, repeats=False)
    res = abfp.tune(model, x, cfg, target=0.999, gain_rule="energy", gains=power_of_two_gains(64, 2), max_repeats=4)
    assert [s.name for s in res.stages] == ["single gain", "gain"]  # repeats chosen with the gains
    assert res.details["allocation"]["reached"]
    assert res.stages[1].metric >= 0.999  # eval inputs are the calibration inputs here
    assert res.stages[1].energy < err.stages[1].energy
    assert set(res.plan.modules) == {"0", "2", "4"}
    for m, cfg_m in res.plan.modules.items():
        assert [cfg_m.gain, cfg_m.repeats] == res.details["settings"][m]
        assert cfg_m.repeats in (1, 2, 4)
    back = abfp.tune.DevicePlan.from_json(res.plan.to_json())
    assert back.modules == res.plan.modules


def test_tune_energy_budget_keeps_the_plan_within_it() -> None:
    model = _mlp()
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    for budget in (0.5, 0.99, 1.3):
        res = abfp.tune(model, x, ABFPConfig(tile_width=8), target=0.999, gain_rule="energy", energy_budget=budget,
                        gains=power_of_two_gains(64, 2), max_repeats=2)
        single, plan = res.stages[0].energy, res.stages[1].energy
        assert res.details["allocation"]["energy_ratio"] == pytest.approx(plan / single, rel=1e-9)
        assert f"within {budget:g}x" in res.stages[1].note
        if budget == 0.5:  # the DACs and ADCs alone cost more: the cheapest plan, said so
            assert plan > budget * single and "none fits" in res.stages[1].note
            assert all(c.gain == 1.0 and c.repeats == 1 for c in res.plan.modules.values())
        else:
            assert plan <= budget * single * (1 + 1e-9) and "none fits" not in res.stages[1].note


@pytest.mark.parametrize("kwargs, msg", [
    ({"gain_rule": "energy", "energy_budget": 0.0}, "energy_budget"),
    ({"energy_budget": 1.5}, "energy_budget"),
    ({"gain_rule": "energy", "gain_tolerance": 0.2}, "energy rule"),
    ({"gain_rule": "energy", "gain_descent": True}, "energy rule"),
    ({"gain_rule": "louder"}, "gain_rule"),
])
def test_tune_energy_rule_bad_options(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        abfp.tune(_mlp(), torch.randn(8, 24), ABFPConfig(), **kwargs)


def test_choose_gains_refuses_the_energy_rule() -> None:
    from abfp.tune import choose_gains

    with pytest.raises(ValueError, match="abfp.tune"):
        choose_gains(_mlp(), torch.randn(4, 24), ABFPConfig(), rule="energy")


def test_tune_energy_is_one_inference_alone_as_abfp_energy_counts_it() -> None:
    """The stage energies are ``abfp.energy.account`` of the plan on one input (the default), and
    accounting 4 inputs together differs by exactly the weight DAC conversions they share."""
    from abfp.energy import EnergyParams, account
    from abfp.nn import to_digital

    model = _mlp()
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    cfg = ABFPConfig(tile_width=8)
    kw = dict(target=0.999, gain_rule="energy", gains=power_of_two_gains(64, 2), max_repeats=2, energy_budget=1.3)
    one = abfp.tune(model, x, cfg, **kw)
    four = abfp.tune(model, x, cfg, energy_samples=4, **kw)
    assert one.energy_samples == 1 and one.plan.info["energy_samples"] == 1 and one.to_dict()["energy_samples"] == 1
    assert four.plan.info["energy_samples"] == 4
    p = EnergyParams()
    weight_dac = (24 * 32 + 32 * 32 + 32 * 6) * p.dac_energy(8, "weight")  # N K per call, 8-bit weights
    for res in (one, four):
        for s in res.stages:
            m = s.plan.convert(model)
            try:
                want = account(m.eval(), x[:1]).totals()["energy_total"]
            finally:
                to_digital(m)
            if res is one:
                assert s.energy == pytest.approx(want, rel=1e-12)
            else:  # four inputs share each call's weight conversions
                assert s.energy == pytest.approx(want - weight_dac * (1 - 1 / 4), rel=1e-12)
        ratio = res.stages[1].energy / res.stages[0].energy
        assert res.details["allocation"]["energy_ratio"] == pytest.approx(ratio, rel=1e-12)
    with pytest.raises(ValueError, match="energy_samples"):
        abfp.tune(model, x, cfg, energy_samples=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fill_budget_keeps_a_module_that_is_off_its_hull(seed: int) -> None:
    # a module moved off its hull (by the refinement) keeps its setting and its energy counts; the
    # others are filled exactly as if it were not there, with the energy it takes subtracted
    settings, losses, energies = _knapsack(seed, "abcd", 0.0)
    path = allocation_path(losses, energies)
    plan = dict(path[len(path) // 3])
    on_hull = {s for p in path for s in [p["a"]]}
    off = next(s for s in settings if s not in on_hull)
    plan["a"] = off
    limit = sum(energies[m][plan[m]] for m in plan) * 1.3
    st = fill_budget(plan, losses, energies, limit)
    assert st["a"] == off
    rest = {m: losses[m] for m in "bcd"}
    alone = fill_budget({m: plan[m] for m in "bcd"}, rest, {m: energies[m] for m in "bcd"}, limit - energies["a"][off])
    assert {m: st[m] for m in "bcd"} == alone
    assert sum(energies[m][st[m]] for m in st) <= limit + 1e-12
    assert alone != {m: plan[m] for m in "bcd"}  # the test exercises the fill
