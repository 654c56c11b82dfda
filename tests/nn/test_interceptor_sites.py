"""An interceptor (``analog_state(m).interceptors[site]``, ``RepeatAverage(per_site=...)``) that names a
site the model does not make would never run: a clear error, never silently unused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import abfp
from abfp import ABFPConfig
from abfp.noise import RepeatAverage

CFG = ABFPConfig(noise_std=0.0, gain=1.0, tile_width=8)


def _model(**kw):
    return abfp.convert(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), CFG, **kw)


def _counting(sites: list):
    def f(call):
        sites.append(call.site)
        return call.analog()
    return f


def test_an_interceptor_on_an_existing_site_runs_only_there():
    m, seen = _model(), []
    abfp.analog_state(m).interceptors["2:linear0"] = _counting(seen)
    m(torch.randn(3, 16))
    m(torch.randn(3, 16))
    assert seen == ["2:linear0", "2:linear0"]


@pytest.mark.parametrize("site", ["9:linear0", "linear0", "fc:linear0", "0.weight:linear0"])
def test_an_interceptor_on_a_site_of_no_module_is_refused_before_any_product(site):
    m, seen = _model(), []
    abfp.analog_state(m).interceptors[site] = _counting(seen)
    with pytest.raises(ValueError, match=f"interceptor site '{site}' names no module"):
        m(torch.randn(3, 16))
    assert seen == []


def test_an_interceptor_on_a_site_its_module_never_makes_is_refused_after_the_forward():
    m = _model()
    abfp.analog_state(m).interceptors["2:linear1"] = _counting([])
    with pytest.raises(ValueError, match=r"'2:linear1' matched no product: module '2' ran and made \['2:linear0'\]"):
        m(torch.randn(3, 16))
    del abfp.analog_state(m).interceptors["2:linear1"]
    m(torch.randn(3, 16))  # a clean state afterwards


def test_an_interceptor_on_an_excluded_modules_site_is_refused():
    m = _model(exclude=["2"])
    abfp.analog_state(m).interceptors["2:linear0"] = _counting([])
    with pytest.raises(ValueError, match="excluded"):
        m(torch.randn(3, 16))


def test_repeat_average_per_site_names_sites_of_the_model():
    x = torch.randn(3, 16)
    m = _model()
    st = abfp.analog_state(m)
    st.interceptors["*"] = RepeatAverage(1, per_site={"0:linear0": 2})
    m(x)  # exists: fine
    st.interceptors["*"] = RepeatAverage(1, per_site={"0:linear3": 2})
    with pytest.raises(ValueError, match="'0:linear3' matched no product"):
        m(x)
    st.interceptors["*"] = RepeatAverage(1, per_site={"fc:linear0": 2})
    with pytest.raises(ValueError, match="'fc:linear0' names no module"):
        m(x)
    st.interceptors.clear()
    st.interceptors["0:linear0"] = RepeatAverage(1, per_site={"2:linear0": 3})  # never sees 2:linear0
    with pytest.raises(ValueError, match="never sees"):
        m(x)


def test_a_site_of_a_module_that_has_not_run_yet_is_checked_after_a_later_forward():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 4), nn.Linear(16, 4)

        def forward(self, x, use_b=False):
            return self.b(x) if use_b else self.a(x)

    m, seen = abfp.convert(Branchy(), CFG), []
    abfp.analog_state(m).interceptors["b:linear0"] = _counting(seen)
    m(torch.randn(2, 16))  # b did not run: nothing to say yet
    m(torch.randn(2, 16), use_b=True)
    assert seen == ["b:linear0"]
