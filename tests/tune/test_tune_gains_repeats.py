"""Per-layer gains (error rule) and repeats: against an independent float64 evaluation of SPEC 1."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import abfp
from abfp import ABFPConfig
from abfp.energy import EnergyParams, account
from abfp.tune import choose_gains, power_of_two_gains
from abfp.tune.repeats import NoiseProfile, allocate, search_repeats


def oracle_linear(x: torch.Tensor, w: torch.Tensor, n: int, gain: float, bits: int = 8) -> torch.Tensor:
    """SPEC section 1 in float64, noise-free, float32 scales (no bf16): X W^T on the device."""
    L = 2 ** (bits - 1) - 1
    x, w = x.double(), w.double()
    K = x.shape[1]
    T = math.ceil(K / n)
    pad = T * n - K
    xp = torch.nn.functional.pad(x, (0, pad)).view(x.shape[0], T, n)
    wp = torch.nn.functional.pad(w, (0, pad)).view(w.shape[0], T, n)
    sx = xp.abs().amax(-1, keepdim=True)
    sw = wp.abs().amax(-1, keepdim=True)
    qx = torch.round(torch.where(sx > 0, xp / sx, torch.zeros_like(xp)).clamp(-1, 1) * L)
    qw = torch.round(torch.where(sw > 0, wp / sw, torch.zeros_like(wp)).clamp(-1, 1) * L)
    d = torch.einsum("mtk,ntk->mnt", qx, qw)
    u = d / (L * L)
    qy = torch.round((gain * u / n).clamp(-1, 1) * L)
    y = qy * (n / (gain * L)) * sx.squeeze(-1)[:, None, :] * sw.squeeze(-1)[None, :, :]
    return y.sum(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_rule_picks_the_brute_force_gain(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    K = int(torch.randint(20, 300, (1,), generator=g))
    x = torch.randn(64, K, generator=g) * torch.rand(64, 1, generator=g)
    layer = nn.Linear(K, 12, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.distributions.Laplace(0.0, 1.0).sample((12, K)))
    cfg = ABFPConfig(tile_width=32, gain=1.0, noise_std=0.0, scale_dtype="float32")
    cands = power_of_two_gains(64)
    ref = x.double() @ layer.weight.detach().double().T
    errs = {c: float((oracle_linear(x, layer.weight.detach(), 32, c) - ref).norm() / ref.norm()) for c in cands}
    ranked = sorted(errs, key=errs.get)
    assert errs[ranked[1]] > errs[ranked[0]] * 1.01  # a clear winner
    chosen = choose_gains(nn.Sequential(layer), x, cfg, candidates=cands)
    assert chosen == {"0": ranked[0]}


def test_error_rule_upstream_on_device_and_arbitrary_gains() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    x = torch.randn(32, 40)
    out = choose_gains(m, x, ABFPConfig(), candidates=[3.0, 5.5, 12.0])
    assert set(out) == {"0", "2"} and set(out.values()) <= {3.0, 5.5, 12.0}
    sat = choose_gains(m, x, ABFPConfig(), rule="saturation", max_gain=64)
    assert set(sat) == {"0", "2"} and all(v in power_of_two_gains(64) for v in sat.values())


def test_bad_gain_options() -> None:
    m = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="rule"):
        choose_gains(m, x, ABFPConfig(), rule="biggest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="candidates"):
        choose_gains(m, x, ABFPConfig(), candidates=[2.0, -1.0])
    with pytest.raises(ValueError, match="candidates"):
        choose_gains(m, x, ABFPConfig(), candidates=[])
    with pytest.raises(TypeError, match="calibration inputs"):
        choose_gains(m, [1, 2], ABFPConfig())


@pytest.mark.parametrize("k", [4, 9])
def test_repeats_divide_the_noise_std_by_sqrt_k(k: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 128)
    w = torch.randn(64, 128)
    base = ABFPConfig(gain=1.0, noise_std=8.0, noise_dist="gaussian", seed=3)  # rounding negligible
    clean = abfp.functional.linear(x, w, config=base.replace(noise_std=0.0))
    stds = []
    for cfg in (base, base.replace(repeats=k)):
        y = abfp.functional.linear(x, w, config=cfg)
        stds.append(float((y - clean).std()))
    # one tile (K = n): noise in y is e * n/(G L) * sx * sw; the ratio is 1/sqrt(k) up to sampling
    assert stds[1] / stds[0] == pytest.approx(1 / math.sqrt(k), rel=0.05)


def test_repeats_multiply_the_energy_counts() -> None:
    m = nn.Sequential(nn.Linear(200, 30))
    x = torch.randn(8, 200)
    p = EnergyParams()
    r1 = account(m, x, ABFPConfig(), p).layers[0]
    r3 = account(m, x, ABFPConfig(repeats=3), p).layers[0]
    T = math.ceil(200 / 128)
    assert r1.adc_conversions == 8 * 30 * T and r3.adc_conversions == 3 * 8 * 30 * T
    assert r3.dac_inputs == 3 * 8 * 200 and r3.dac_weights == r1.dac_weights
    assert r3.macs == r1.macs == 8 * 30 * 200
    assert r3.energy["analog"] == pytest.approx(3 * 8 * 30 * 200 * p.analog_mac * 8.0)
    assert r3.energy["adc"] == pytest.approx(3 * r1.energy["adc"])


def test_repeats_field_validated_and_labelled() -> None:
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="repeats"):
            ABFPConfig(repeats=bad)  # type: ignore[arg-type]
    assert "k=4" in ABFPConfig(repeats=4).label() and "k=" not in ABFPConfig().label()
    assert ABFPConfig.from_json(ABFPConfig(repeats=5).to_json()).repeats == 5


def test_allocation_and_search_reach_the_target_at_least_lambda() -> None:
    prof = NoiseProfile({"a": 0.4, "b": 0.1, "c": 0.0}, {"a": 1.0, "b": 4.0, "c": 1.0})
    k = allocate(prof, 10.0, 16)
    assert k == {"a": 4, "b": 1, "c": 1}  # k ~ r / sqrt(c): 10*0.4/1, 10*0.1/2 -> 0.5 -> 1

    def score(reps: dict[str, int]) -> float:  # total noise variance, lower is better
        return sum(r * r / reps[m] for m, r in prof.noise_error.items())

    found = search_repeats(prof, lambda reps: -score(reps), lambda v: v >= -0.03, max_repeats=16, steps=20)
    assert found.reached and score(found.repeats) <= 0.03
    # one less repeat anywhere (where possible) misses the target: the least energy at this allocation
    less = dict(found.repeats)
    less["a"] -= 1
    assert score(less) > 0.03
    ones = search_repeats(prof, lambda reps: -score(reps), lambda v: v >= -1.0)
    assert ones.repeats == {"a": 1, "b": 1, "c": 1}


def test_unreachable_target_keeps_no_repeats() -> None:
    prof = NoiseProfile({"a": 0.4, "b": 0.1}, {"a": 1.0, "b": 4.0})
    found = search_repeats(prof, lambda reps: -sum(0.1 + r * r / reps[m] for m, r in prof.noise_error.items()),
                           lambda v: v >= -0.1, max_repeats=8)
    assert not found.reached and found.repeats == {"a": 1, "b": 1} and len(found.trials) == 2


def test_descent_lowers_the_costliest_first_and_stops_at_the_target() -> None:
    from abfp.tune.descent import descend_gains

    # a made-up model: the metric is 1 - sum of per-module errors, error of module m at gain g = w_m / g
    w = {"a": 0.02, "b": 0.001, "c": 0.004}
    cost = {"a": 1.0, "b": 5.0, "c": 3.0}

    def score(g: dict[str, float]) -> float:
        return 1.0 - sum(w[m] / g[m] for m in g)

    start = {m: 64.0 for m in w}
    res = descend_gains(start, [1, 2, 4, 8, 16, 32, 64], cost, score, lambda v: v >= 0.998, score(start))
    assert score(res.gains) >= 0.998 and res.metric == score(res.gains)
    assert [t[0] for t in res.trials][0] == "b"  # the costliest module first
    for m in w:  # locally minimal: one more lowering of any module misses the target
        if res.gains[m] > 1:
            assert score({**res.gains, m: res.gains[m] / 2}) < 0.998
    # a start that misses the target lowers nothing
    assert descend_gains(start, [1, 64], cost, score, lambda v: v >= 2.0, score(start)).gains == start


def test_tune_gain_descent_saves_energy_and_keeps_the_target() -> None:
    import abfp
    from abfp.zoo.base import Dataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6))
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    res = abfp.tune(model, x, ABFPConfig(tile_width=8), target=0.999, gain_descent=True, repeats=False)
    assert [s.name for s in res.stages] == ["single gain", "gain", "gain descent"]
    gain, desc = res.stages[1], res.stages[2]
    # eval inputs are the calibration inputs here: both plans reach the target on them
    assert gain.metric >= 0.999 and desc.metric >= 0.999, (gain.metric, desc.metric)
    before = res.details["error_rule_gains"]
    assert all(res.plan.modules[m].gain <= before[m] for m in res.plan.modules)
    assert any(res.plan.modules[m].gain < before[m] for m in res.plan.modules)
    assert desc.energy < gain.energy
    assert len(res.details["gain_descent_trials"]) >= len(res.plan.modules)


def test_per_layer_gains_worse_than_the_single_gain_on_calibration_are_not_kept(monkeypatch) -> None:
    """The per-layer rules minimise a proxy (each layer's error or saturation); where their plan
    scores worse on the calibration inputs than the single gain, tune keeps the single gain and
    says so, instead of returning a plan worse than the device it started from."""
    import abfp
    import abfp.tune.api as api

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 6))
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    cfg = ABFPConfig(tile_width=8, gain=2.0, noise_std=0.0)
    good = abfp.tune(model, x, cfg, repeats=False)
    assert good.details["gain_check"]["text"] == ""  # the error rule beats G=2 here and is kept
    assert good.stages[1].metric >= good.stages[0].metric
    # a rule that saturates every layer (gain 4096): far worse on calibration
    monkeypatch.setattr(api, "choose_gains", lambda model, *a, **k: {"0": 4096.0, "2": 4096.0})
    res = abfp.tune(model, x, cfg, repeats=False)
    check = res.details["gain_check"]
    assert check["per_layer"] < check["single_gain"] - check["stderr"]
    assert "kept the single gain" in res.stages[1].note
    assert all(c.gain == 2.0 for c in res.plan.modules.values()) and set(res.plan.modules) == {"0", "2"}
    assert res.details["gains"] == {"0": 2.0, "2": 2.0}
    assert res.stages[1].metric == res.stages[0].metric


def test_tune_refuses_a_metric_that_scores_nan() -> None:
    """A NaN float32 score made a NaN target that no plan meets: every stage ran to max repeats
    and reported NaN. It is refused before any stage."""
    from abfp.zoo.base import Metric

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    broken = Metric("broken", "fidelity", lambda out, tgt, ref: float("nan"))
    with pytest.raises(FloatingPointError, match="'broken' of the float32 model on the calibration inputs is nan"):
        abfp.tune(model, torch.randn(8, 8), ABFPConfig(tile_width=8), metric=broken)


def test_tune_refusing_bad_input_leaves_no_journal(tmp_path) -> None:
    """The journal was started before the float32 pass: a NaN input or score left it behind, and the
    next run was told it 'holds an unfinished run'."""
    torch.manual_seed(0)
    x = torch.randn(8, 8)
    x[2, 3] = float("nan")
    journal = tmp_path / "t.journal.json"
    with pytest.raises(FloatingPointError, match="sample 2 is NaN"):
        abfp.tune(nn.Sequential(nn.Linear(8, 4)).eval(), x, ABFPConfig(tile_width=8), journal=journal)
    assert not journal.exists()
