"""Noise models: standard deviations against float64 formulas (statistically), seeds, b_eff, repeats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import abfp
from abfp.noise import (NoiseInjector, RepeatAverage, ShotNoise, ThermalNoise, WeightNoise, device_config,
                        device_config_for_energy, effective_bits, make_noise, repeat_overrides)

DRAWS = 3000
TOL = 0.07  # relative; the std of a std estimate from 3000 draws is ~1.3 %


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _empirical_std(inj: NoiseInjector, x_rep: Tensor, clean: Tensor) -> Tensor:
    with torch.no_grad():
        y = inj(x_rep).double()
    return (y - clean.double()).std(0)


def test_shot_noise_on_a_linear_layer_matches_float64():
    lin = nn.Linear(24, 5)
    x = torch.randn(3, 24, generator=_gen(0))
    energy = torch.tensor([0.5, 2.0, 10.0, 40.0, 100.0])
    inj = NoiseInjector(lin, "shot", per_channel=True, seed=1)
    inj.profile([x])
    site = inj.sites[0]
    inj.set_energy({site: energy})
    xr = x.repeat(DRAWS, 1, 1)  # (DRAWS, 3, 24): every row an independent draw
    with torch.no_grad():
        clean = lin(x)
        noisy = inj(xr).double()
    diff = noisy - clean.double()
    xd, wd = x.double(), lin.weight.detach().double()
    expect = xd.norm(dim=1, keepdim=True) * wd.norm(dim=1) / torch.sqrt(24 * energy.double())
    assert torch.allclose(diff.std(0), expect, rtol=TOL)
    assert diff.mean(0).abs().max() < 4 * (expect / math.sqrt(DRAWS)).max()


def _patches(x: torch.Tensor, w: torch.Tensor, padding: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 im2col: ||patch||^2 and the non-padding count per (batch, group, position)."""
    x = x.double()
    k = w.shape[-1]
    cg = w.shape[1]
    norms, counts = [], []
    for gi in range(groups):
        xs = x[:, gi * cg:(gi + 1) * cg]
        cols = F.unfold(xs, k, padding=padding)  # (B, cg*k*k, L)
        ones = F.unfold(torch.ones_like(xs), k, padding=padding)
        norms.append((cols**2).sum(1))
        counts.append(ones.sum(1))
    return torch.stack(norms, 1), torch.stack(counts, 1)  # (B, groups, L)


@pytest.mark.parametrize("groups", [1, 3])
def test_shot_noise_on_a_convolution_uses_the_im2col_patch(groups):
    conv = nn.Conv2d(3, 6, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(1, 3, 4, 4, generator=_gen(2))
    e = 5.0
    inj = NoiseInjector(conv, ShotNoise(), seed=3, energy=e)
    inj.profile([x])
    with torch.no_grad():
        clean = conv(x)
    std = _empirical_std(inj, x.repeat(DRAWS, 1, 1, 1), clean)  # (6, 4, 4)
    norms, counts = _patches(x, conv.weight, 1, groups)
    per_out = conv.out_channels // groups
    xn = norms[0].repeat_interleave(per_out, 0).reshape(6, 4, 4)
    d = counts[0].repeat_interleave(per_out, 0).reshape(6, 4, 4)
    wn = conv.weight.detach().double().flatten(1).norm(dim=1).reshape(6, 1, 1)
    expect = xn.sqrt() * wn / torch.sqrt(d * e)
    assert torch.allclose(std, expect, rtol=TOL)
    assert d.min() < d.max()  # corners see fewer MACs than the interior


def test_shot_noise_on_an_attention_matmul():
    class MM(nn.Module):
        def forward(self, a, b):
            return a @ b

    a = torch.randn(2, 3, 8, generator=_gen(4))
    b = torch.randn(2, 8, 4, generator=_gen(5))
    inj = NoiseInjector(MM(), "shot", seed=0, energy=3.0)
    inj.profile([(a, b)])
    with torch.no_grad():
        noisy = inj(a.repeat(DRAWS, 1, 1, 1), b.repeat(DRAWS, 1, 1, 1)).double()
    std = (noisy - (a @ b).double()).std(0)
    expect = a.double().norm(dim=-1, keepdim=True) * b.double().norm(dim=-2, keepdim=True) / math.sqrt(8 * 3.0)
    assert torch.allclose(std, expect, rtol=TOL)


def test_thermal_noise_uses_the_quantiser_ranges():
    lin = nn.Linear(16, 4, bias=False)
    x = torch.randn(5, 16, generator=_gen(6))
    inj = NoiseInjector(lin, ThermalNoise(), seed=0, energy=0.2)
    inj.profile([x])  # calibrates R_x = max(x) - min(x)
    with torch.no_grad():
        clean = lin(x)
    std = _empirical_std(inj, x[:1].repeat(DRAWS, 1), clean[:1])
    rx = float(x.double().max() - x.double().min())
    rw = float(lin.weight.detach().double().max() - lin.weight.detach().double().min())
    expect = 0.01 * math.sqrt(16 / 0.2) * rw * rx
    assert torch.allclose(std, torch.full_like(std, expect), rtol=TOL)


def test_weight_noise_is_per_weight_shared_by_the_batch_and_redrawn_every_forward():
    lin = nn.Linear(10, 3, bias=False)
    x = torch.randn(1, 10, generator=_gen(7))
    energy = torch.tensor([1.0, 4.0, 25.0])
    inj = NoiseInjector(lin, WeightNoise(), per_channel=True, seed=0)
    inj.profile([x])
    inj.set_energy({inj.sites[0]: energy})
    with torch.no_grad():
        two = inj(x.repeat(2, 1))
        assert torch.allclose(two[0], two[1], rtol=0, atol=1e-6)  # one weight draw per forward, shared by the batch
        outs = torch.stack([inj(x)[0] for _ in range(2000)]).double()
    rw = float(lin.weight.detach().double().max() - lin.weight.detach().double().min())
    sigma_w = 0.1 / torch.sqrt(energy.double()) * rw
    expect = sigma_w * x.double().norm()
    std = (outs - lin(x)[0].detach().double()).std(0)
    assert torch.allclose(std, expect, rtol=TOL)


def test_noise_is_reproducible_with_a_seed_and_redrawn_every_forward():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 8, generator=_gen(8))
    a = NoiseInjector(m, "shot+thermal+weight", seed=11, energy=2.0)
    a.profile([x])
    b = NoiseInjector(m, "shot+thermal+weight", seed=11, energy=2.0)
    b.profile([x])
    with torch.no_grad():
        y1, y2 = a(x), a(x)
        assert not torch.equal(y1, y2)  # redrawn every forward
        assert torch.equal(b(x), y1)  # same seed, same draws
        a.reseed()
        assert torch.equal(a(x), y1)
        a.reseed(12)
        assert not torch.equal(a(x), y1)
        a.enabled = False
        assert torch.equal(a(x), m(x))


def test_combined_noises_add_in_variance():
    lin = nn.Linear(12, 3)
    x = torch.randn(2, 12, generator=_gen(9))
    shot = NoiseInjector(lin, "shot", energy=1.5)
    therm = NoiseInjector(lin, "thermal", energy=1.5)
    both = NoiseInjector(lin, "shot+thermal", energy=1.5)
    for inj in (shot, therm, both):
        inj.profile([x])
    s, t, b = (inj.noise.unit_variance(inj.profiles[inj.sites[0]]) for inj in (shot, therm, both))
    assert torch.allclose(b, s + t)
    assert make_noise("shot+thermal").name == "shot+thermal"
    with pytest.raises(ValueError):
        make_noise("pink")


def test_effective_bits_formula_and_per_layer_report():
    # a quantiser's own error: sigma = R / (sqrt(12) (2^b - 1)) gives back b
    for b in (2, 4, 8):
        assert effective_bits(3.0, 3.0 / (math.sqrt(12) * (2**b - 1))) == pytest.approx(b)
    assert effective_bits(1.0, 0.0) == math.inf
    lin = nn.Linear(20, 4)
    x = torch.randn(6, 20, generator=_gen(10))
    inj = NoiseInjector(lin, "shot", energy=7.0)
    inj.profile([x])
    with torch.no_grad():
        y = lin(x).double()
    r = float(y.max() - y.min())
    wn2 = lin.weight.detach().double().norm(dim=1) ** 2
    var = (x.double().norm(dim=1, keepdim=True) ** 2 * wn2 / (20 * 7.0)).mean()
    assert inj.effective_bits()[inj.sites[0]] == pytest.approx(math.log2(1 + r / (math.sqrt(12) * var.sqrt())),
                                                                rel=1e-6)
    # four times the energy halves sigma
    before = inj.effective_bits()[inj.sites[0]]
    inj.scale_energy(4.0)
    after = inj.effective_bits()[inj.sites[0]]
    assert 2 ** after - 1 == pytest.approx(2 * (2**before - 1), rel=1e-6)


def test_repeats_set_and_round_energies():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    inj = NoiseInjector(m, "shot", per_channel=True)
    inj.profile([torch.randn(3, 4, generator=_gen(11))])
    s0, s1 = inj.sites
    inj.set_repeats(10.0, {s0: 3, s1: [1, 2]})
    assert inj.energies()[s0] == pytest.approx([30.0] * 4)
    assert inj.energies()[s1] == pytest.approx([10.0, 20.0])
    assert inj.repeats(10.0) == {s0: [3] * 4, s1: [1, 2]}
    assert inj.repeats(7.0)[s1] == [2, 3]
    with pytest.raises(ValueError):
        inj.set_repeats(10.0, {s0: 0})
    with pytest.raises(ValueError):
        inj.set_repeats(10.0, {s0: 1.5})
    # a misspelt site is refused (it used to be ignored: every site then ran `default` repeats)
    before = inj.energies()
    with pytest.raises(KeyError, match="unknown site 'nosuch:linear0'"):
        inj.set_repeats(10.0, {s0: 2, "nosuch:linear0": 4})
    assert inj.energies() == before
    # MAC-weighted mean over layers (each layer's E the mean over its channels)
    inj.set_energy({s0: 2.0, s1: [1.0, 5.0]})
    macs = inj.macs()
    expect = (macs[s0] * 2.0 + macs[s1] * 3.0) / (macs[s0] + macs[s1])
    assert float(inj.mean_energy()) == pytest.approx(expect)


def test_abfp_device_noise_under_repeats():
    cfg = abfp.ABFPConfig(noise_std=0.6)
    assert device_config(cfg, 4).noise_std == pytest.approx(0.3)
    assert device_config(0.6, 9).noise_std == pytest.approx(0.2)
    assert device_config_for_energy(cfg, 2.0).noise_std == pytest.approx(0.6 / math.sqrt(2))
    assert repeat_overrides(cfg, {"0": 4})["0"].noise_std == pytest.approx(0.3)
    with pytest.raises(ValueError):
        device_config(cfg, 0)
    # literal repeats on the device: averaging 4 runs halves the noise-dominated error
    lin = nn.Linear(64, 16, bias=False)
    x = torch.randn(64, 64, generator=_gen(12))
    noisy = abfp.ABFPConfig(noise_std=6.0, noise_dist="gaussian", gain=1.0, seed=0)
    model = abfp.convert(lin, noisy)
    with torch.no_grad():
        ref = lin(x)
        e1 = (model(x) - ref).std()
        abfp.analog_state(model).interceptors["*"] = RepeatAverage(4)
        e4 = (model(x) - ref).std()
    assert float(e4 / e1) == pytest.approx(0.5, rel=0.15)
