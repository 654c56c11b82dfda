"""No state outlives a converted forward, however it ends; fixed point never silently dynamic;
converted-model noise streams are the documented ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import abfp
import abfp.functional as AF
from abfp import ABFPConfig
from abfp.nn import mode as abfp_mode
from abfp.noise_keys import stream_start

# coarse converters: the device result is far from float32, so "analog" is easy to see
COARSE = ABFPConfig(noise_std=0.0, input_bits=4, weight_bits=4, output_bits=6, gain=1.0, tile_width=8)


class Boom(Exception):
    pass


class Interrupt(BaseException):
    """Like KeyboardInterrupt: not an Exception, so torch skips the always-called forward hooks."""


class Raiser(nn.Module):
    def __init__(self, exc: BaseException | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.exc = exc

    def forward(self, x):
        y = self.fc(x)
        if self.exc is not None:
            raise self.exc
        return y


def _modes() -> list:
    return list(_get_current_function_mode_stack())


def _probe() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A fresh converted model, its input and the device result computed without convert."""
    m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    x = torch.randn(5, 16)
    with torch.no_grad():
        h = torch.relu(AF.linear(x, m[0].weight, m[0].bias, config=COARSE))
        expect = AF.linear(h, m[2].weight, m[2].bias, config=COARSE)
    assert not torch.equal(expect, m(x))  # the device is visibly not float32
    return abfp.convert(m, COARSE), x, expect


def _assert_clean(before: list) -> None:
    am, x, expect = _probe()
    with torch.no_grad():
        assert torch.equal(am(x), expect), "a converted model ran digitally after the failure"
    assert _modes() == before, "torch's function-mode stack was left changed"
    assert abfp_mode._stack() == []


def _failing_models():
    # an exception raised in a submodule's forward
    sub = nn.Sequential(nn.Linear(16, 16), Raiser(Boom("sub")), nn.Linear(16, 4))
    yield "submodule", sub, torch.randn(3, 16), Boom
    # an exception raised inside a product (the device refuses a NaN input)
    yield "product", nn.Sequential(nn.Linear(16, 4)), torch.full((3, 16), float("nan")), ValueError
    # a BaseException (KeyboardInterrupt-like): torch skips the always-called exit hooks
    yield "base_exception", nn.Sequential(nn.Linear(16, 16), Raiser(Interrupt()), nn.Linear(16, 4)), torch.randn(3, 16), Interrupt


@pytest.mark.parametrize("case", ["submodule", "product", "base_exception"])
def test_an_exception_in_a_converted_forward_leaves_no_state(case):
    before = _modes()
    name, model, x, exc = next(c for c in _failing_models() if c[0] == case)
    am = abfp.convert(model, COARSE)
    with pytest.raises(exc):
        am(x)
    _assert_clean(before)


def test_an_exception_in_an_interceptor_leaves_no_state():
    before = _modes()
    am = abfp.convert(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)), COARSE)

    def fail(call):
        raise Boom(call.site)

    abfp.analog_state(am).interceptors["1:linear0"] = fail
    with pytest.raises(Boom, match="1:linear0"):
        am(torch.randn(2, 16))
    _assert_clean(before)


@pytest.mark.parametrize("strict", [False, True])
def test_a_failed_torch_export_leaves_no_state(strict):
    before = _modes()
    am = abfp.convert(nn.Sequential(nn.Linear(16, 4)), COARSE.replace(noise_dist="gaussian", noise_std=0.5))
    with pytest.raises(RuntimeError, match="cannot be traced"):
        torch.export.export(am, (torch.randn(3, 16),), strict=strict)
    _assert_clean(before)


def test_a_traced_call_leaves_no_state():
    before = _modes()
    am = abfp.convert(nn.Sequential(nn.Linear(16, 4)), COARSE.replace(noise_std=0.0))
    torch.export.export(am, (torch.randn(3, 16),))
    _assert_clean(before)
    with torch.no_grad():
        torch.compile(am, fullgraph=True, backend="eager")(torch.randn(3, 16))
    _assert_clean(before)


def test_a_stale_inner_frame_does_not_lend_its_config_to_the_outer_module():
    """The outer forward catches a BaseException of an inner module (whose exit hook never ran)
    and goes on: its next product must use its own config, not the dead inner module's."""

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Raiser(Interrupt())
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            try:
                self.inner(x)
            except Interrupt:
                pass
            return self.fc(x)

    before = _modes()
    m = Outer()
    am = abfp.convert(m, COARSE, exclude=["inner"])  # the inner module is digital
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = am(x)
        assert torch.equal(y, AF.linear(x, m.fc.weight, m.fc.bias, config=COARSE))
    assert _modes() == before and abfp_mode._stack() == []


def test_an_interrupt_then_a_plain_product_outside_any_module_is_digital():
    before = _modes()
    a, w = torch.randn(3, 16), torch.randn(4, 16)
    fp32 = F.linear(a, w)
    am = abfp.convert(nn.Sequential(Raiser(Interrupt())), COARSE)
    with pytest.raises(Interrupt):
        am(torch.randn(2, 16))
    assert torch.equal(F.linear(a, w), fp32)  # no converted module runs: float32
    _assert_clean(before)


def test_a_user_mode_around_a_converted_model_is_kept():
    class Passing(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    am = abfp.convert(nn.Sequential(nn.Linear(16, 16), Raiser(Interrupt())), COARSE)
    with Passing() as user_mode:
        inside = _modes()
        with pytest.raises(Interrupt):
            am(torch.randn(2, 16))
        _assert_clean(inside)
        assert _modes()[-1] is user_mode


# ----------------------------------------------------------------------------- fixed point
def test_an_uncalibrated_fixed_point_product_raises_naming_the_site():
    am = abfp.convert(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)),
                      COARSE.replace(mode="fixed"))
    with pytest.raises(ValueError, match=r"0:linear0.*abfp\.calibrate\(model, batches\)"):
        am(torch.randn(4, 16))


def test_a_calibrated_fixed_point_model_uses_the_static_scale_for_every_batch():
    """Two batches with different max |x| must use the one calibrated scale, not their own."""
    cfg = COARSE.replace(mode="fixed")
    m = nn.Sequential(nn.Linear(16, 4))
    calib = torch.randn(8, 16) * 3.0
    am = abfp.convert(m, cfg)
    abfp.calibrate(am, [calib])
    s = float(calib.abs().max())
    for scale in (0.5, 2.0):
        x = torch.randn(4, 16) * scale
        with torch.no_grad():
            expect = AF.linear(x, m[0].weight, m[0].bias, config=cfg, input_scale=s)
            assert torch.equal(am(x), expect)


def test_summary_calibrates_a_fixed_point_model_it_converts_on_the_example():
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    s = abfp.summary(m, torch.randn(4, 16), COARSE.replace(mode="fixed"))
    assert [r.site for r in s.rows] == ["0:linear0", "2:linear0"]


# ----------------------------------------------------------------------------- noise keys
def test_converted_model_noise_streams_are_the_documented_ones():
    """A converted model's products draw, in call order, from one generator per (device, seed)
    started at seed * 1_000_003 + offset (bit-identical to numerics v3 before the policy module)."""
    seed = 11
    for dist in ("uniform", "gaussian"):
        cfg = ABFPConfig(seed=seed, noise_std=0.5, noise_dist=dist, tile_width=8)
        m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
        am = abfp.convert(m, cfg)
        xs = [torch.randn(3, 16) for _ in range(2)]
        for offset in (0, 5):
            abfp.reseed(am, offset)
            got = torch.stack([am(x) for x in xs]).detach()
            g = torch.Generator().manual_seed((seed * 1_000_003 + offset) % 2**63)
            with torch.no_grad():
                want = torch.stack([AF.linear(torch.relu(AF.linear(x, m[0].weight, m[0].bias, config=cfg, generator=g)),
                                              m[2].weight, m[2].bias, config=cfg, generator=g) for x in xs])
            assert torch.equal(got, want)
            assert stream_start(seed, offset) == (seed * 1_000_003 + offset) % 2**63


@pytest.mark.parametrize("kwargs,match", [(dict(overrides={"zzz": COARSE}), "'zzz' matches no module"),
                                          (dict(overrides={"0(": COARSE}), "neither a module name .* nor a valid regular expression"),
                                          (dict(exclude=["nope"]), "'nope' matches no module"),
                                          (dict(overrides={"zz:linear0": COARSE}), "names product sites of no module")])
def test_set_config_checks_patterns_as_convert_does_and_changes_nothing_on_error(kwargs, match):
    """A bad pattern given to set_config raises (it used to be accepted and silently match
    nothing) and leaves the model's configs as they were."""
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    m = abfp.convert(net, COARSE, exclude=["2"])
    state = abfp.analog_state(m)
    before = (state.config, dict(state.overrides), state.exclude, dict(state.module_configs))
    with pytest.raises(ValueError, match=match):
        abfp.set_config(m, COARSE.replace(gain=4.0), **kwargs)
    with pytest.raises(ValueError, match=match):
        abfp.convert(net, COARSE, **kwargs)
    assert (state.config, dict(state.overrides), state.exclude, dict(state.module_configs)) == before
    abfp.set_config(m, COARSE.replace(gain=4.0), overrides={"0": COARSE}, exclude=[])  # good patterns still work
    assert state.module_configs["2"] == COARSE.replace(gain=4.0) and state.module_configs["0"] == COARSE


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("where", ["root", "submodule"])
def test_an_exception_in_an_exported_forward_leaves_no_state(strict, where):
    """Non-strict export runs forward with ``torch.compiler.is_compiling()`` true, where torch
    skips the always-called exit hooks when forward raises: the converted forward itself must
    leave torch's modes (its own export handler included) as they were."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    before, dispatch_before = _modes(), list(_get_current_dispatch_mode_stack())

    class RaisesAfterProducts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.inner = Raiser(ValueError("inner") if where == "submodule" else None)

        def forward(self, x):
            y = self.inner(self.fc(x))  # products ran before the raise
            if where == "root":
                raise ValueError("root")
            return y

    am = abfp.convert(RaisesAfterProducts(), COARSE)
    with pytest.raises(Exception, match=where if where == "root" else "inner"):
        torch.export.export(am, (torch.randn(3, 16),), strict=strict)
    assert _modes() == before, "torch's function-mode stack was left changed"
    assert list(_get_current_dispatch_mode_stack()) == dispatch_before
    assert abfp_mode._stack() == []
    a, b = torch.randn(7, 9, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    expect = (a.unsqueeze(2) * b.unsqueeze(0)).sum(1)  # independent of matmul
    assert torch.allclose(torch.matmul(a, b), expect, rtol=1e-12, atol=1e-12)
    _assert_clean(before)


def test_the_guarded_forward_follows_copies_and_goes_with_to_digital():
    """convert wraps each module's ``forward`` (see abfp.nn.mode.GuardedForward): a deep copy's
    wrapper runs the copy, and to_digital restores the module's own ``forward``."""
    import copy

    m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    x = torch.randn(5, 16)
    am = abfp.convert(m, COARSE)
    c = copy.deepcopy(am)
    with torch.no_grad():
        c[0].weight.mul_(2.0)  # the copy's products see the copy's weights, not am's
        expect = AF.linear(torch.relu(AF.linear(x, c[0].weight, c[0].bias, config=COARSE)), c[2].weight, c[2].bias,
                           config=COARSE)
        assert torch.equal(c(x), expect)
    abfp.to_digital(am)
    assert all("forward" not in mm.__dict__ for mm in am.modules())
    with torch.no_grad():
        assert torch.equal(am(x), m(x))
