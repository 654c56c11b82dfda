"""Overrides that name one product site (``"attn:matmul1"``) or a regex over sites."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import abfp
import abfp.functional as AF
from abfp import ABFPConfig

BASE = ABFPConfig(tile_width=8, gain=1.0, noise_std=0.0)
WIDE = ABFPConfig(tile_width=8, gain=1.0, noise_std=0.0, input_bits=12, weight_bits=12, output_bits=16)
LOUD = BASE.replace(gain=4.0, output_bits=6)


class Attn(nn.Module):
    """One head of attention: two activation-by-activation products (matmul0: scores, matmul1: mix)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-2, -1) / 4.0, -1)
        return self.proj(a @ v)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attn()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _by_hand(m: Net, x: torch.Tensor, scores: ABFPConfig, mix: ABFPConfig, rest: ABFPConfig) -> torch.Tensor:
    """The same network through abfp.functional, with the configs of the two attention products given."""
    q, k, v = AF.linear(x, m.attn.qkv.weight, m.attn.qkv.bias, config=rest).chunk(3, -1)
    a = torch.softmax(AF.matmul(q, k.transpose(-2, -1), config=scores) / 4.0, -1)
    y = AF.linear(AF.matmul(a, v, config=mix), m.attn.proj.weight, m.attn.proj.bias, config=rest)
    return AF.linear(y, m.head.weight, m.head.bias, config=rest)


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))


def test_one_site_gets_its_own_config():
    m = _net()
    cm = abfp.convert(m, BASE, overrides={"attn:matmul1": WIDE})
    sites = {r.site: r.config for r in abfp.summary(cm, X).rows}
    assert sites["attn:matmul1"] == WIDE
    assert sites["attn:matmul0"] == BASE and sites["attn.qkv:linear0"] == BASE and sites["head:linear0"] == BASE
    with torch.no_grad():
        y = cm(X)
        assert torch.equal(y, _by_hand(m, X, scores=BASE, mix=WIDE, rest=BASE))
        # and it is not what the module-wide config gives
        assert not torch.equal(y, _by_hand(m, X, scores=BASE, mix=BASE, rest=BASE))


def test_two_products_of_one_module_get_two_configs_and_sites_win_over_modules():
    m = _net()
    cm = abfp.convert(m, BASE, overrides={"attn": LOUD, "attn:matmul0": WIDE, r"attn:matmul1": BASE})
    sites = {r.site: r.config for r in abfp.summary(cm, X).rows}
    assert (sites["attn:matmul0"], sites["attn:matmul1"]) == (WIDE, BASE)
    # the module override still reaches the module's other products and its submodules
    assert sites["attn.qkv:linear0"] == LOUD and sites["attn.proj:linear0"] == LOUD and sites["head:linear0"] == BASE


def test_a_regex_over_sites():
    m = _net()
    cm = abfp.convert(m, BASE, overrides={r".*:matmul\d": WIDE})
    sites = {r.site: r.config for r in abfp.summary(cm, X).rows}
    assert sites["attn:matmul0"] == sites["attn:matmul1"] == WIDE
    assert sites["attn.qkv:linear0"] == BASE and sites["head:linear0"] == BASE
    with torch.no_grad():
        assert torch.equal(cm(X), _by_hand(m, X, scores=WIDE, mix=WIDE, rest=BASE))


def test_set_config_and_copies_keep_site_overrides_apart():
    m = _net()
    cm = abfp.convert(m, BASE, overrides={"attn:matmul1": WIDE})
    twin = abfp.convert(cm, BASE, inplace=False)  # re-converted without the override
    abfp.set_config(cm, BASE, overrides={"attn:matmul0": LOUD})
    sites = {r.site: r.config for r in abfp.summary(cm, X).rows}
    assert (sites["attn:matmul0"], sites["attn:matmul1"]) == (LOUD, BASE)
    assert {r.site: r.config for r in abfp.summary(twin, X).rows}["attn:matmul1"] == BASE


def test_a_site_override_reincludes_that_product_of_an_excluded_module():
    """As a module override wins over ``exclude``, so does a site override: the product it names
    runs on the device with its config; the excluded module's other products stay digital."""
    net = _net()
    cm = abfp.convert(net, BASE, exclude=["attn"], overrides={"attn:matmul1": WIDE})
    s = abfp.summary(cm, X)
    assert {r.site: r.config for r in s.rows if r.kind != "digital"} == {"attn:matmul1": WIDE, "head:linear0": BASE}
    assert sum(r.kind == "digital" for r in s.rows) == 3  # qkv, matmul0, proj
    assert 0 < s.device_mac_share < 1
    with torch.no_grad():  # the same numbers as computing that one product on the device by hand
        q, k, v = net.attn.qkv(X).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-2, -1) / 4.0, -1)
        want = AF.linear(net.attn.proj(AF.matmul(a, v, config=WIDE)), net.head.weight, net.head.bias, config=BASE)
        torch.testing.assert_close(cm(X), want, rtol=0, atol=0)
    # without the override the whole module is digital
    plain = abfp.summary(abfp.convert(net, BASE, exclude=["attn"]), X)
    assert {r.site for r in plain.rows if r.kind != "digital"} == {"head:linear0"}


def test_a_site_pattern_that_names_no_module_is_refused():
    with pytest.raises(ValueError, match="names product sites of no module"):
        abfp.convert(_net(), BASE, overrides={"atn:matmul1": WIDE})
    with pytest.raises(ValueError, match="matches no module"):
        abfp.convert(_net(), BASE, overrides={"atn": WIDE})


def test_a_site_override_that_matches_no_product_of_its_module_is_named_after_the_forward():
    """``"head:linear1"`` (head makes linear0 only) or ``"attn:conv0"`` used to set nothing, silently."""
    from abfp.nn.state import OverrideWarning
    cm = abfp.convert(_net(), BASE, overrides={"head:linear1": LOUD, r"attn:conv\d": LOUD, "attn:matmul1": WIDE})
    with pytest.warns(OverrideWarning) as got, torch.no_grad():
        cm(X)
    text = sorted(str(w.message) for w in got)
    assert len(text) == 2
    assert "'attn:conv\\\\d' matched no product site" in text[0] and "'attn:matmul0'" in text[0]
    assert "'head:linear1' matched no product site" in text[1] and "['head:linear0']" in text[1]
    import warnings
    with warnings.catch_warnings():  # once per override; the override that matched says nothing
        warnings.simplefilter("error", OverrideWarning)
        with torch.no_grad():
            cm(X)
        cm2 = abfp.convert(_net(), BASE, overrides={"attn:matmul1": WIDE})
        with torch.no_grad():
            cm2.attn(X)  # a submodule run alone is a whole forward too
            cm2(X)


def test_a_site_override_of_a_module_that_has_not_run_waits_for_it():
    from abfp.nn.state import OverrideWarning
    cm = abfp.convert(_net(), BASE, overrides={"head:linear2": LOUD})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", OverrideWarning)
        with torch.no_grad():
            cm.attn(X)  # head did not run: nothing known yet
    with pytest.warns(OverrideWarning, match="head:linear2"), torch.no_grad():
        cm(X)
