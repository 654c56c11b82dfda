"""Learned precision: the constrained loss, the energy search, learning, the experiment end to end."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from abfp.noise import NoiseInjector
from abfp.precision import (DEFAULT_LAMBDA, PrecisionSettings, TargetNotReached, constrained_loss, energy_penalty,
                            learn_energies, mac_weighted_mean, plot_precision, run_precision, search_min_energy,
                            shuffled_batches)

sys.path.insert(0, str(Path(__file__).parent))
import tiny_precision_task  # noqa: E402


def test_constrained_loss_penalises_only_above_the_target():
    ce = torch.tensor(0.7)
    log_t = math.log(10.0)
    below = torch.tensor(math.log(8.0), requires_grad=True)
    assert constrained_loss(ce, below, log_t, 2.0).item() == pytest.approx(0.7)
    above = torch.tensor(math.log(20.0), requires_grad=True)
    loss = constrained_loss(ce, above, log_t, 2.0)
    assert loss.item() == pytest.approx(0.7 + 2.0 * math.log(2.0))
    loss.backward()
    assert float(above.grad) == pytest.approx(2.0)
    assert energy_penalty(below, log_t).item() == 0.0
    with pytest.raises(ValueError):
        constrained_loss(ce, above, log_t, -1.0)
    assert DEFAULT_LAMBDA == {"shot": 2.0, "thermal": 6.0, "weight": 8.0}


def test_mac_weighted_mean():
    e = torch.tensor([1.0, 10.0, 100.0])
    macs = torch.tensor([100.0, 10.0, 1.0])
    assert float(mac_weighted_mean(e, macs)) == pytest.approx((100 + 100 + 100) / 111)


@pytest.mark.parametrize("start", [0.01, 37.0, 5e4])
def test_search_finds_the_crossing_of_a_monotone_toy(start):
    crossing = 37.3

    def f(e):  # smooth, increasing, crosses 0.5 at e = crossing
        return 1.0 - 0.5 * math.exp(-(e - crossing) / 10.0) if e >= crossing else 0.5 * math.exp((e - crossing) / 10.0)

    r = search_min_energy(f, 0.5, start=start, rel_tol=0.01)
    assert crossing <= r.energy <= crossing * 1.01
    assert r.metric >= 0.5
    failed = [e for e, v in r.evaluations if v < 0.5]
    assert max(failed) >= r.energy / 1.01 * (1 - 1e-12)
    assert len(r.evaluations) < 25


def test_search_reports_an_unreachable_target_and_a_free_one():
    with pytest.raises(TargetNotReached):
        search_min_energy(lambda e: 0.0, 1.0, highest=1e3)
    r = search_min_energy(lambda e: 1.0, 0.5, start=1.0, lowest=0.25)
    assert r.energy == 0.25


def _tiny_injector(noise="shot", per_channel=False, energy=1.0):
    task = tiny_precision_task.make()
    data = task.load_data()
    inj = NoiseInjector(task.build_model(), noise, per_channel=per_channel, seed=0, energy=energy)
    inj.profile([data.inputs])
    return inj, data


def test_learning_moves_only_the_energies_and_respects_the_constraint():
    inj, data = _tiny_injector(per_channel=True, energy=5.0)
    weights = [p.detach().clone() for p in inj.model.parameters()]
    batches = shuffled_batches(data.inputs, data.targets, 32, seed=0)
    # a strong penalty pulls E_mean down to a target below the start ...
    learn_energies(inj, batches, target_energy=1.0, lam=50.0, steps=150, lr=0.05)
    assert float(inj.mean_energy()) < 1.5
    assert all(torch.equal(a, b) for a, b in zip(weights, inj.model.parameters()))
    assert all(p.requires_grad for p in inj.model.parameters())  # flags restored
    assert not any(t.requires_grad for t in inj.parameters())
    # ... and without it the task loss only ever asks for more energy
    before = float(inj.mean_energy())
    res = learn_energies(inj, shuffled_batches(data.inputs, data.targets, 32, seed=1), target_energy=1.0, lam=0.0,
                         steps=30, lr=0.05, log_every=10)
    assert float(inj.mean_energy()) > before
    assert [h["step"] for h in res.history] == [10, 20, 30]


def test_experiment_end_to_end_on_a_tiny_task(tmp_path):
    task = tiny_precision_task.make()
    st = PrecisionSettings(noise="weight", steps=20, batch_size=16, final_seeds=1, rel_tol=0.1, target_drop=10.0,
                           start_energy=1.0, lr=0.05)
    r = run_precision(task, st)
    for key in ("noise", "target_metric", "uniform_energy", "uniform_metric", "learned_energy", "learned_metric",
                "energy_saving", "aj_per_mac_uniform", "aj_per_mac_learned", "layers"):
        assert key in r
    assert r["target_metric"] == pytest.approx(90.0)
    assert r["uniform_metric"] >= 90.0 and r["learned_metric"] >= 90.0
    assert r["energy_saving"] == pytest.approx(1 - r["learned_energy"] / r["uniform_energy"])
    assert r["aj_per_mac_learned"] == pytest.approx(0.128 * r["learned_energy"])
    assert [x["site"] for x in r["layers"]] == ["0:conv0", "3:linear0", "5:linear0"]
    assert all(x["b_eff_learned"] > 0 for x in r["layers"])
    png = plot_precision(r, tmp_path / "p.png")
    assert png.stat().st_size > 1000


def test_settings_are_validated():
    with pytest.raises(ValueError):
        PrecisionSettings(noise="pink")
    with pytest.raises(ValueError):
        PrecisionSettings(target_drop=-1.0)
    with pytest.raises(ValueError):
        PrecisionSettings(lam=-2.0)
    with pytest.raises(ValueError):
        PrecisionSettings(search_seeds=0)
    assert PrecisionSettings(noise="thermal").lambda_ == 6.0
