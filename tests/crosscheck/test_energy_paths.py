"""One quantity, one number: MACs, ADC conversions and energy per inference through every path
that reports them (abfp.summary, abfp.energy.account, abfp energy), against an independent
float64 hand count of SPEC section 6 (the formulas of docs/energy.md, not abfp's code)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import abfp
from abfp.energy import EnergyParams, account

P = EnergyParams(analog_mac=0.0013, dac_input=0.07, dac_weight=0.05, adc=1.1, reference_bits=8.0,
                 digital_multiply=0.3, digital_add=0.11, digital_compare=0.031)
B = 2


class Five(nn.Module):
    """A linear on tokens, a grouped convolution, a grouped transposed convolution, an
    activation matmul and a 1-d convolution."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(20, 7)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.tconv = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
        self.c1 = nn.Conv1d(3, 5, 4)

    def forward(self, x, img, a, b, seq):
        return (self.fc(x).sum() + self.conv(img).sum() + self.tconv(img).sum() + torch.matmul(a, b).sum()
                + self.c1(seq).sum())


def _inputs():
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(s, generator=g) for s in ((B, 3, 20), (B, 4, 5, 5), (B, 5, 20), (B, 20, 6), (B, 3, 11)))


# (site, M rows, N outputs, K per group, groups, weight DAC conversions, dynamically scaled second operand)
PRODUCTS = [
    ("fc:linear0", B * 3, 7, 20, 1, 7 * 20, 0),
    ("conv:conv0", B * 25, 6, 2 * 9, 2, 6 * 2 * 9, 0),
    # transposed: per input position and group, C_in/g = 2 inputs -> C_out/g * 2 * 2 = 12 outputs
    ("tconv:conv0", B * 25, 6 * 4, 2, 2, 24 * 2, 0),
    (":matmul0", B * 5, 6, 20, 1, B * 20 * 6, B * 20 * 6),
    ("c1:conv0", B * 8, 5, 12, 1, 5 * 12, 0),
]


def _hand(cfg: abfp.ABFPConfig) -> dict[str, float]:
    """Per inference, float64, from the formulas alone."""
    n, k, G = cfg.tile_width, cfg.repeats, float(cfg.gain)
    fixed = cfg.mode == "fixed"
    tot = {"macs": 0.0, "adc": 0.0, "dac_in": 0.0, "dac_w": 0.0, "energy": 0.0, "energy_adc": 0.0}
    for _, M, N, K, g, dw, dyn_w in PRODUCTS:
        T = math.ceil(K / n)
        macs, adc, dac_in = M * N * K, M * N * T * k, M * K * g * k
        dyn = M * K * g + dyn_w
        mults = (1 if fixed else 2) * M * N * T + dyn
        adds = M * N * (T - 1) + M * N * T * (k - 1)
        e_adc = adc * P.adc * 2.0 ** (cfg.output_bits - 8)
        e = (macs * k * P.analog_mac * G + dac_in * P.dac_input * 2.0 ** (cfg.input_bits - 8)
             + dw * P.dac_weight * 2.0 ** (cfg.weight_bits - 8) + e_adc + mults * P.digital_multiply
             + adds * P.digital_add + (0 if fixed else dyn) * P.digital_compare)
        for key, v in (("macs", macs), ("adc", adc), ("dac_in", dac_in), ("dac_w", dw), ("energy", e),
                       ("energy_adc", e_adc)):
            tot[key] += v
    return {key: v / B for key, v in tot.items()}


CONFIGS = [abfp.ABFPConfig(tile_width=8, gain=4.0, input_bits=6, weight_bits=7, output_bits=9),
           abfp.ABFPConfig(tile_width=8, gain=2.0, repeats=3),
           abfp.ABFPConfig(tile_width=8, mode="fixed"),
           abfp.ABFPConfig(tile_width=128, gain=8.0)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label())
def test_energy_per_inference_equals_a_hand_count(cfg):
    t = account(Five().eval(), _inputs(), cfg, P).totals()
    h = _hand(cfg)
    assert (t["macs"], t["adc_conversions"], t["dac_inputs"], t["dac_weights"]) == \
        (h["macs"], h["adc"], h["dac_in"], h["dac_w"])
    assert t["energy_total"] == pytest.approx(h["energy"], rel=1e-12)
    assert t["energy_adc"] == pytest.approx(h["energy_adc"], rel=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label())
def test_summary_and_energy_count_the_same_conversions(cfg):
    """abfp.summary's ADC conversions are the device's, k per output per tile with k repeats
    (they were one simulated pass's: 1/k of what abfp energy charged)."""
    model = Five().eval()
    s = abfp.summary(model, _inputs(), cfg, errors=False)
    rep = account(model, _inputs(), cfg, P)
    assert [r.site for r in s.rows] == [c.site for c in rep.layers] == [p[0] for p in PRODUCTS]
    for r, c in zip(s.rows, rep.layers):
        assert (r.macs, r.adc_conversions) == (c.macs, c.adc_conversions), r.site
        assert 0.0 <= r.saturated_fraction <= 1.0
    assert sum(r.adc_conversions for r in s.rows) / B == _hand(cfg)["adc"]
    assert s.total_macs / B == _hand(cfg)["macs"]


def test_summary_counts_each_sites_own_repeats():
    """A plan's per-module repeats: each row counts its own k."""
    base = abfp.ABFPConfig(tile_width=8)
    model = abfp.convert(Five().eval(), base, overrides={"conv": base.replace(repeats=4)})
    s = abfp.summary(model, _inputs(), errors=False)
    rep = account(model, _inputs(), base, P)
    by_site = {r.site: r for r in s.rows}
    for c in rep.layers:
        assert by_site[c.site].adc_conversions == c.adc_conversions
    one = abfp.summary(Five().eval(), _inputs(), base, errors=False)
    assert {r.site: r.adc_conversions for r in s.rows} == \
        {r.site: r.adc_conversions * (4 if r.site == "conv:conv0" else 1) for r in one.rows}


class SharedAttention(nn.Module):
    """One attention module run on two sequence lengths: its two matmul sites each see two
    pairs of operand shapes; and ``x @ w`` with a 2-d activation ``w`` shared by the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.att = _Att()

    def forward(self, x, y, w):
        return self.att(x).sum() + self.att(y).sum() + (x @ w).sum()


class _Att(nn.Module):
    def forward(self, q):
        return torch.softmax(q @ q.transpose(-1, -2), -1) @ q


def test_a_site_run_on_two_shapes_is_counted_per_shape():
    """Counted from each call's own shapes (they were all counted from the last call's: 480
    input and 480 weight DAC conversions for 288 and 288, and 480 ADC conversions where the
    summary counted 288); a second operand shared by the batch is converted once per call."""
    cfg = abfp.ABFPConfig(tile_width=8)
    x, y, w = torch.randn(2, 6, 16), torch.randn(2, 3, 16), torch.randn(16, 5)
    s = abfp.summary(SharedAttention().eval(), (x, y, w), cfg, errors=False)
    rep = account(SharedAttention().eval(), (x, y, w), cfg, P)
    by = {c.site: c for c in rep.layers}

    def hand(calls):  # (batch, M per product, N, K, second operand's products)
        t = {"macs": 0, "adc": 0, "dac_in": 0, "dac_w": 0}
        for b, m, n, k, wp in calls:
            t["macs"] += b * m * n * k
            t["adc"] += b * m * n * math.ceil(k / 8)
            t["dac_in"] += b * m * k
            t["dac_w"] += wp * k * n
        return t

    truth = {"att:matmul0": hand([(2, 6, 6, 16, 2), (2, 3, 3, 16, 2)]),   # q @ q^T
             "att:matmul1": hand([(2, 6, 16, 6, 2), (2, 3, 16, 3, 2)]),   # A @ q
             ":matmul0": hand([(2, 6, 5, 16, 1)])}                         # x @ w, w shared
    for r in s.rows:
        c, h = by[r.site], truth[r.site]
        assert (c.macs, c.adc_conversions, c.dac_inputs, c.dac_weights) == (h["macs"], h["adc"], h["dac_in"], h["dac_w"])
        assert (r.macs, r.adc_conversions) == (c.macs, c.adc_conversions)
        assert c.max_compares == c.dac_inputs + c.dac_weights  # ABFP: every dynamic value's block max
    # the explorer's cost model and the tune rules price the same rows the same way
    from abfp.explore.costs import CostModel  # noqa: PLC0415
    from abfp.explore.designs import Design  # noqa: PLC0415

    cm = CostModel.from_model(SharedAttention().eval(), (x, y, w), P, base=cfg)
    d = Design("abfp", 8, 8, 8, 8, 2.0, 0.0)
    t = account(SharedAttention().eval(), (x, y, w), d.config(cfg), P).totals()
    assert cm.energy(d, cfg)["total"] == pytest.approx(t["energy_total"], rel=1e-12)


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_k_repeats_are_the_noise_of_std_over_sqrt_k(kernel):
    """SPEC section 5: a device with ``k`` repeats is the device with noise ``std / sqrt(k)``
    (same seed: the same outputs, bit for bit), at ``k`` times the ADC and analog energy."""
    ex = abfp.ExecutionOptions(seed=3, kernel=kernel)
    a = abfp.ABFPConfig(tile_width=8, noise_std=1.0, repeats=4)
    b = abfp.ABFPConfig(tile_width=8, noise_std=0.5)
    outs = []
    for cfg in (a, b, b.replace(noise_std=0.0)):
        m = abfp.convert(Five().eval(), cfg, execution=ex)
        with torch.no_grad():
            outs.append(m(*_inputs()))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    ea, eb = (account(Five().eval(), _inputs(), c, P).totals() for c in (a, b))
    assert ea["adc_conversions"] == 4 * eb["adc_conversions"] and ea["energy_analog"] == pytest.approx(4 * eb["energy_analog"])


def test_the_settings_energy_does_not_read_change_no_count_and_the_command_says_so(capsys, tmp_path):
    """``abfp energy --config`` accepted noise, scale-format and execution fields and used none of them,
    silently. They change no count or energy (checked here field by field), and the command says so."""
    from abfp.cli import main  # noqa: PLC0415
    from abfp.energy import UNACCOUNTED_FIELDS, unaccounted_settings  # noqa: PLC0415

    base = abfp.ABFPConfig(tile_width=8, noise_std=0.0)
    other = dict(noise_std=2.0, noise_dist="gaussian", scale_dtype="pow2", bf16_tile_outputs=True, bf16_io=True)
    assert set(other) == set(UNACCOUNTED_FIELDS)
    want = account(Five().eval(), _inputs(), base, P).totals()
    for cfg in [base.replace(**{f: v}) for f, v in other.items()] + [base.replace(kernel="reference", seed=5)]:
        assert account(Five().eval(), _inputs(), cfg, P).totals() == want
    assert unaccounted_settings(abfp.ABFPConfig()) == []
    assert unaccounted_settings(base.replace(seed=5, gain=2.0)) == ["noise_std 0.0", "seed 5"]
    task = str(Path(__file__).parents[1] / "evaluate" / "tiny_task.py") + ":make"
    assert main(["energy", "--task", task, "--config", '{"noise_std": 0.5, "seed": 3, "gain": 2}']) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["abfp: note: the device's noise_std 0.5, seed 3 change no energy or operation count: not used "
                   "(noise is paid for through repeats)"]
    assert main(["energy", "--task", task, "--config", '{"gain": 2}']) == 0
    assert capsys.readouterr().err == ""
