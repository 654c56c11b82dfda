"""Energy accounting: counts against abfp.summary, energies by hand, the authors' 2.8x, JSON."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import abfp
from abfp.energy import EnergyParams, account, account_rows, authors_adc_comparison, layer_cost


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 5 * 5, 40)
        self.out = nn.Linear(20, 3)

    def forward(self, x):
        h = torch.relu(self.dw(torch.relu(self.conv(x))))
        t = self.fc(h.flatten(1)).reshape(-1, 2, 20)
        a = torch.softmax(t @ t.transpose(1, 2), -1) @ t
        return self.out(a.mean(1))


def test_counts_match_the_summary_rows():
    cfg = abfp.ABFPConfig(tile_width=32)
    x = torch.randn(3, 4, 5, 5)
    s = abfp.summary(Mixed().eval(), x, cfg)
    rep = account_rows(s.rows, 3)
    assert [c.site for c in rep.layers] == [r.site for r in s.rows]
    for c, r in zip(rep.layers, s.rows):
        assert c.macs == r.macs
        assert c.adc_conversions == r.adc_conversions  # M * N * T
        assert c.tiles == r.tiles
    conv, dw, fc, mm0, mm1, out = rep.layers
    # conv: M = 3*25 positions, K = 36 -> T = 2; dw: groups 8, K = 9, 8 groups of 75 x 9 inputs
    assert (conv.M, conv.N, conv.K, conv.tiles) == (75, 8, 36, 2)
    assert conv.dac_inputs == 75 * 36 and conv.dac_weights == 8 * 36
    assert dw.groups == 8 and dw.dac_inputs == 75 * 9 * 8 and dw.dac_weights == 8 * 9
    assert fc.accumulate_adds == 3 * 40 * (7 - 1)  # K = 200 -> 7 tiles of 32
    assert fc.scale_multiplies == 2 * fc.adc_conversions
    # matmul t @ t^T: 3 products of (2 x 20) @ (20 x 2), both operands dynamic
    assert mm0.products == 3 and mm0.dac_inputs == 3 * 2 * 20 and mm0.dac_weights == 3 * 20 * 2
    assert mm0.max_compares == mm0.dac_inputs + mm0.dac_weights
    assert rep.totals(per_inference=True)["macs"] == pytest.approx(sum(r.macs for r in s.rows) / 3)


def test_energies_by_hand():
    p = EnergyParams(analog_mac=0.01, dac_input=0.2, dac_weight=0.1, adc=2.0, reference_bits=8, digital_multiply=0.5,
                     digital_add=0.25, digital_compare=0.125)
    cfg = abfp.ABFPConfig(tile_width=8, gain=4.0, output_bits=10, input_bits=6, weight_bits=8)
    c = layer_cost("fc", "linear", (5, 20), (3, 20), 5 * 3 * 20, 1, cfg, p)
    T = 3
    assert (c.M, c.N, c.K, c.tiles) == (5, 3, 20, T)
    assert c.energy["analog"] == pytest.approx(300 * 0.01 * 4.0)  # gain 4 costs 4x the analog product
    assert c.energy["adc"] == pytest.approx(5 * 3 * T * 2.0 * 2**2)  # 2^(b_y - 8)
    assert c.energy["dac"] == pytest.approx(5 * 20 * 0.2 * 2**-2 + 3 * 20 * 0.1)
    assert c.energy["digital"] == pytest.approx((2 * 45 + 100) * 0.5 + 15 * (T - 1) * 0.25 + 100 * 0.125)
    fixed = layer_cost("fc", "linear", (5, 20), (3, 20), 300, 1, cfg.replace(mode="fixed"), p)
    assert fixed.scale_multiplies == fixed.adc_conversions and fixed.max_compares == 0
    assert EnergyParams(gain_costs_analog=False).analog_energy(8.0) == EnergyParams().analog_mac


def test_the_authors_adc_comparison_is_2_8x():
    cmp_ = authors_adc_comparison()
    assert cmp_.ratio == pytest.approx(2**4.5 / 8)
    assert cmp_.ratio == pytest.approx(2.83, abs=0.01)
    assert cmp_.macs_per_conversion_ratio == 16
    assert cmp_.per_mac_ratio == pytest.approx(16 * 2**4.5 / 8)
    # independent of the ADC's absolute energy
    assert authors_adc_comparison(EnergyParams(adc=7.0, reference_bits=6)).ratio == pytest.approx(cmp_.ratio)


def test_params_json_round_trip_and_validation(tmp_path):
    p = EnergyParams(adc=3.5, gain_costs_analog=False)
    assert EnergyParams.from_json(p.to_json()) == p
    path = tmp_path / "e.json"
    p.to_json(path)
    assert EnergyParams.from_json(path) == p
    with pytest.raises(ValueError):
        EnergyParams(adc=-1.0)
    with pytest.raises(ValueError):
        EnergyParams.from_dict({"adc_pj": 1.0})
    with pytest.raises(ValueError):
        EnergyParams.from_json("{not json")


def test_account_runs_the_summary_and_formats_a_table():
    rep = account(Mixed().eval(), torch.randn(2, 4, 5, 5), abfp.ABFPConfig())
    text = str(rep)
    assert "total" in text and "fc:linear0" in text
    d = rep.to_dict()
    assert d["per_inference"]["energy_total"] == pytest.approx(d["per_batch"]["energy_total"] / 2)
    assert math.isclose(sum(c["energy_total"] for c in d["layers"]), d["per_batch"]["energy_total"])
