"""Compiled and exported converted models count what they compute (``abfp::count``).

A traced product's MACs are added to the model's :class:`~abfp.ops.coverage.Coverage` by the
custom operator ``abfp::count`` when the graph runs, not when it is traced: ``N`` compiled calls
count ``N`` times what one eager call counts (analog and digital, by name), an exported program
with a dynamic batch counts each call's own batch, tracing counts nothing, a backward pass counts
nothing (as eager), and a program whose model is gone counts nowhere. ``model.compile()`` after
``abfp.convert`` keeps the root's frame (:class:`abfp.nn.mode.RootCompile`): a product in a root
forward hook stays on the device (it ran in float32 before).
"""

from __future__ import annotations

import copy
import gc
import pickle
import warnings

import pytest
import torch
from torch import nn

import abfp
from abfp.nn.mode import RootCall, RootCompile
from abfp.ops.coverage import coverage_for

NOISE_FREE = abfp.ABFPConfig(noise_std=0.0, gain=4.0)


class Net(nn.Module):
    """A convolution, a linear layer and a linear layer the tests exclude (a digital product)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 * 6 * 6, 5)
        self.skip = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(torch.relu(self.head(self.conv(x).flatten(1))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return abfp.convert(Net(), NOISE_FREE, exclude=["skip"])


def _macs(b: int) -> tuple[int, dict[str, int]]:
    """One call's counts at batch ``b``, written out: conv ``b*4*6*6`` outputs of ``3*3*3`` MACs,
    head ``b*5`` outputs of ``144``, and the excluded ``skip`` ``b*5*5`` (digital)."""
    return b * 4 * 6 * 6 * 27 + b * 5 * 144, {"torch.linear (excluded module)": b * 5 * 5}


def _counts(m: nn.Module) -> tuple[int, dict[str, int]]:
    c = abfp.coverage(m)
    assert c.digital_macs == sum(c.digital_ops.values())
    return c.analog_macs, dict(c.digital_ops)


def _times(n: int, counts: tuple[int, dict[str, int]]) -> tuple[int, dict[str, int]]:
    return n * counts[0], {k: n * v for k, v in counts[1].items()}


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_compiled_calls_count_as_many_eager_calls(how):
    x = torch.randn(2, 3, 8, 8)
    m = _net()
    with torch.no_grad():
        ye = m(x)
    eager = _counts(m)
    assert eager == _macs(2)
    abfp.coverage(m).reset()
    if how == "model.compile()":
        m.compile(backend="aot_eager")
        f = m
    else:
        f = torch.compile(m, backend="aot_eager")
    with torch.no_grad():
        outs = [f(x) for _ in range(3)]
    assert _counts(m) == _times(3, eager)
    for y in outs:
        assert torch.equal(y, ye)


def test_compiled_with_inductor_counts_and_equals_eager():
    x = torch.randn(2, 3, 8, 8)
    m = _net()
    with torch.no_grad():
        ye = m(x)
    abfp.coverage(m).reset()
    f = torch.compile(m)
    with torch.no_grad():
        y1, y2 = f(x), f(x)
    assert _counts(m) == _times(2, _macs(2))
    assert torch.equal(y1, ye) and torch.equal(y2, ye)


def test_a_backward_pass_counts_nothing_as_in_eager():
    x = torch.randn(2, 3, 8, 8)
    m = _net()
    f = torch.compile(m, backend="aot_eager")
    for _ in range(2):
        f(x).sum().backward()
    assert _counts(m) == _times(2, _macs(2))
    assert m.head.weight.grad is not None


def test_export_with_a_dynamic_batch_counts_each_call_and_not_the_trace():
    m = _net()
    ep = torch.export.export(m, (torch.randn(2, 3, 8, 8),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    assert _counts(m) == (0, {})  # tracing is no call
    run = ep.module()
    with torch.no_grad():
        for b in (3, 5):
            x = torch.randn(b, 3, 8, 8)
            torch.testing.assert_close(run(x), m(x), rtol=0, atol=0)
    assert _counts(m) == _times(2, (sum(_macs(b)[0] for b in (3, 5)),
                                    {k: sum(_macs(b)[1][k] for b in (3, 5)) for k in _macs(1)[1]}))


def test_a_program_whose_model_is_gone_counts_nowhere():
    m = _net()
    x = torch.randn(2, 3, 8, 8)
    run = torch.export.export(m, (x,)).module()
    token = abfp.coverage(m).token
    assert coverage_for(token) is abfp.coverage(m)
    del m
    gc.collect()
    assert coverage_for(token) is None
    with torch.no_grad():
        assert run(x).shape == (2, 5)  # runs, counting nothing


def test_a_copy_counts_apart_from_its_original():
    m = _net()
    x = torch.randn(2, 3, 8, 8)
    f = torch.compile(m, backend="aot_eager")
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert abfp.coverage(c).token != abfp.coverage(m).token
        g = torch.compile(c, backend="aot_eager")
        with torch.no_grad():
            g(x)
        assert _counts(c) == _macs(2)
    with torch.no_grad():
        f(x)
    assert _counts(m) == _macs(2)


class TimesP:
    """A picklable forward hook: ``out @ p``."""

    def __init__(self, p: torch.Tensor) -> None:
        self.p = p

    def __call__(self, mod, args, out):
        return out @ self.p


@pytest.mark.parametrize("hooked", [False, True])
def test_module_compile_after_convert_keeps_the_root_frame(hooked):
    """``model.compile()`` replaced the root's RootCall: a product in a root forward hook ran in
    float32 (noise-free, the compiled output was the float32 hook's, 0.13 from eager)."""
    torch.manual_seed(0)
    p = torch.randn(5, 3)
    x = torch.randn(2, 3, 8, 8)
    ms = []
    for _ in range(2):
        m = _net()
        if hooked:
            m.register_forward_hook(TimesP(p))
        ms.append(m)
    eager, comp = ms
    with torch.no_grad():
        ye = eager(x)
        if hooked:  # the hook's product is on the device: not the float32 one
            assert not torch.allclose(ye, abfp.to_digital(copy.deepcopy(eager))(x), atol=1e-3)
    comp.compile(backend="aot_eager")
    assert isinstance(comp.__dict__["_compiled_call_impl"], RootCall)
    with torch.no_grad():
        y1, y2 = comp(x), comp(x)
    assert torch.equal(y1, ye) and torch.equal(y2, ye)
    assert _counts(comp) == _times(2, _counts(eager))
    assert _counts(eager)[0] == _macs(2)[0] + (2 * 5 * 3 if hooked else 0)


def test_root_compile_is_copied_and_to_digital_removes_it():
    m = _net()
    assert isinstance(m.__dict__.get("compile"), RootCompile)
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert isinstance(c.__dict__.get("compile"), RootCompile) and c.compile.module is c
    x = torch.randn(2, 3, 8, 8)
    m.compile(backend="aot_eager")
    with torch.no_grad():
        m(x)
    d = abfp.to_digital(m)
    assert "compile" not in d.__dict__ and not isinstance(d.__dict__["_compiled_call_impl"], RootCall)
    torch.manual_seed(0)
    ref = Net()  # the same weights, never converted
    with torch.no_grad():
        torch.testing.assert_close(d(x), ref(x), rtol=1e-6, atol=1e-6)  # float32 again, not the traced graph


class Dist(nn.Module):
    """A linear layer, then ``torch.cdist`` (no analog model: named and counted digital)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(self.lin(x), x)


def test_a_named_digital_product_counts_per_compiled_and_exported_call():
    """``torch.cdist`` of ``b`` points by ``b`` in 4 dimensions: ``b*b*4`` digital MACs, the linear
    layer ``b*4*4`` analog; an export with a dynamic batch used to pin the batch (``int()`` of the
    symbolic MAC estimate)."""
    torch.manual_seed(0)
    m = abfp.convert(Dist(), NOISE_FREE)
    name = "torch.cdist (no analog model)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = torch.compile(m, backend="aot_eager")
        with torch.no_grad():
            f(torch.randn(3, 4))
            f(torch.randn(3, 4))
        assert _counts(m) == (2 * 3 * 16, {name: 2 * 9 * 4})
        abfp.coverage(m).reset()
        ep = torch.export.export(m, (torch.randn(3, 4),), dynamic_shapes=({0: torch.export.Dim("b", min=2, max=25)},))
        with torch.no_grad():
            ep.module()(torch.randn(5, 4))
    assert _counts(m) == (5 * 16, {name: 25 * 4})
