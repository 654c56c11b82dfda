"""The model's MACs and the device's share of them through every path that reports them:
``abfp.summary`` (rows and coverage), ``abfp.coverage`` of a converted model after a forward,
``abfp.energy.account`` and an ``abfp.evaluate`` record's ``device_mac_share``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import abfp
from abfp.energy import account
from abfp.evaluate import runner
from abfp.evaluate.grid import Point
from abfp.zoo.base import COSINE, Dataset


class HalfDigital(nn.Module):
    """Two linear layers on the device and an integer matmul that stays digital."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(10, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        i = (h > 0).long()
        return self.out(torch.relu(h)) + (i @ i.transpose(0, 1)).float().sum()


def test_every_path_counts_the_same_macs():
    x = torch.randn(4, 10)
    cfg = abfp.ABFPConfig(tile_width=8)
    analog, digital = 4 * 6 * 10 + 4 * 3 * 6, 4 * 4 * 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = abfp.summary(HalfDigital().eval(), x, cfg, errors=False)
        m = abfp.convert(HalfDigital().eval(), cfg)
        with torch.no_grad():
            m(x)
        rec = runner.evaluate(HalfDigital().eval(), Dataset((x,)), COSINE, [Point("abfp", cfg)], progress=False,
                              runs=1, batch_size=4)[-1]
    assert sum(r.macs for r in s.rows if r.kind != "digital") == s.coverage.analog_macs == analog
    assert sum(r.macs for r in s.rows if r.kind == "digital") == s.coverage.digital_macs == digital
    cov = abfp.coverage(m)
    assert (cov.analog_macs, cov.digital_macs) == (analog, digital)
    assert account(HalfDigital().eval(), x, cfg).totals()["macs"] * 4 == analog
    assert rec["device_mac_share"] == pytest.approx(analog / (analog + digital), rel=1e-12)
