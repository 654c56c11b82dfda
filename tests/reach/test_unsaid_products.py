"""Products that escaped a converted model unsaid until session 18: each is now on the device
(counted analog, equal to the float64 SPEC evaluation) or named (a ``DigitalProductWarning``,
counted digital).

1. forward hooks and forward pre-hooks on the converted model's root (``nn/mode.RootCall``);
2. public methods that multiply their arguments (``nn/mode.makes_products``), called from outside,
   and generator methods, each step in the module's frame (``GuardedMethod._steps``);
3. linear algebra that multiplies inside LAPACK (``ops/coverage._LINALG``): named and counted digital;
4. (products in another thread: left, docs/families.md says why)
5. weight-only quantised GEMMs, ``torch._trilinear``, complex ``dot``/``vdot``/``vecdot``, ``matrix_power(A, n < 0)``:
   named and counted digital; an ``autograd.Function``'s forward checked to be on the device;
   ``torch.cond``, ``while_loop``, ``scan`` and ``map`` bodies on the device (``nn/mode.answer_control_flow``).
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import abfp
from abfp.nn.mode import RootCall
from abfp.ops.coverage import DigitalProductWarning

sys.path.insert(0, str(Path(__file__).parents[1] / "numerics"))
from spec64 import spec64  # noqa: E402

CFG = abfp.ABFPConfig(noise_std=0.0, tile_width=8, gain=1.0)


def _counts(m: nn.Module) -> tuple[int, int]:
    c = abfp.coverage(m)
    return c.analog_macs, c.digital_macs


def _on_device(y: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor) -> None:
    """``y`` is the device's ``x @ w_t`` (SPEC section 1, noise off): within one ADC code of the
    float64 evaluation, and not float32's product."""
    want, code = spec64(x.reshape(-1, x.shape[-1]), w_t.t(), CFG, with_code=True)
    got = y.reshape(want.shape).double()
    assert ((got - want).abs() <= code + 1e-6 * want.abs()).all()
    assert not torch.allclose(y, x @ w_t, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 1. root hooks
def _root() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4)).eval()  # 2 rows: 64 MACs


@pytest.mark.parametrize("when", ["before", "after"])
def test_root_forward_hooks_run_on_the_device(when):
    """A product in a root forward hook and one in a root pre-hook (registered before or after
    ``convert``) are device products of the root: counted, and SPEC's numbers. Before the fix the
    root counted its own 64 MACs only, the hooks' ran in float32."""
    torch.manual_seed(1)
    p_pre, p_post, x = torch.randn(8, 8), torch.randn(4, 6), torch.randn(2, 8)
    seen = {}

    def pre(mod, args):
        seen["pre_in"] = args[0]
        seen["pre"] = args[0] @ p_pre
        return (seen["pre"],)

    def post(mod, args, out):
        seen["post_in"] = out
        seen["post"] = out @ p_post
        return seen["post"]

    model = _root()
    if when == "before":
        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)
    m = abfp.convert(model, CFG, inplace=True)
    if when == "after":
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
    with torch.no_grad():
        m(x)
    assert _counts(m) == (2 * 8 * 8 + 64 + 2 * 4 * 6, 0)
    _on_device(seen["pre"], seen["pre_in"], p_pre)
    _on_device(seen["post"], seen["post_in"], p_post)
    # one site numbering over the hooks and the forward: the pre-hook's product first
    s = abfp.summary(m, x)
    assert [r.site for r in s.rows if r.kind == "matmul"] == [":matmul0", ":matmul1"]


def test_root_hooks_with_kwargs_prepend_always_call_and_removal():
    torch.manual_seed(2)
    p = torch.randn(4, 4)
    m = abfp.convert(_root(), CFG)
    h1 = m.register_forward_pre_hook(lambda mod, a, kw: ((a[0] @ torch.eye(8),), kw), with_kwargs=True, prepend=True)
    h2 = m.register_forward_hook(lambda mod, a, kw, out: out @ p, with_kwargs=True, always_call=True)
    with torch.no_grad():
        m(torch.randn(2, 8))
    assert _counts(m) == (2 * 8 * 8 + 64 + 2 * 4 * 4, 0)
    h1.remove()
    h2.remove()
    abfp.coverage(m).reset()
    with torch.no_grad():
        m(torch.randn(2, 8))
    assert _counts(m) == (64, 0)

    # an always-called hook runs when the forward raises: still inside the root's frame, on the
    # device; the failed call's counts are rolled back (no count outlives a failed call)
    seen = []
    ones = torch.ones(3, 4)
    m.register_forward_hook(lambda mod, a, out: seen.append(ones @ p), always_call=True)
    with pytest.raises(ValueError, match="in_features"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(torch.randn(2, 7))  # wrong width: the Linear raises
    assert len(seen) == 1 and _counts(m) == (64, 0)
    _on_device(seen[0], ones, p)
    assert not abfp.nn.mode._stack()  # no frame left behind


def test_a_root_forward_replaced_after_convert_runs_on_the_device():
    """``m.forward = f`` after ``convert`` replaces the root's guard: ``f``'s own products ran in
    float32, uncounted (32 of 64 MACs); now they run in the root's frame."""
    torch.manual_seed(6)
    w, x = torch.randn(4, 4), torch.randn(2, 8)
    m = abfp.convert(_root(), CFG)
    old = m.forward
    seen = {}

    def forward(inp):
        seen["in"] = old(inp)
        seen["out"] = seen["in"] @ w
        return seen["out"]

    m.forward = forward
    with torch.no_grad():
        m(x)
    assert _counts(m) == (64 + 2 * 4 * 4, 0)
    _on_device(seen["out"], seen["in"], w)


class TimesP:
    """A picklable forward hook: ``out @ p``."""

    def __init__(self, p: torch.Tensor) -> None:
        self.p = p

    def __call__(self, mod, args, out):
        return out @ self.p


def test_root_call_survives_copies_and_to_digital_removes_it():
    """torch drops ``_compiled_call_impl`` from copies (``Module.__getstate__``): a deep copy and a
    pickled converted model set theirs again; ``to_digital`` takes it off."""
    import io

    m = abfp.convert(_root(), CFG)
    m.register_forward_hook(TimesP(torch.randn(4, 4)))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for c in (copy.deepcopy(m), torch.load(buf, weights_only=False)):
        assert isinstance(c.__dict__.get("_compiled_call_impl"), RootCall) and c._compiled_call_impl.module is c
        with torch.no_grad():
            c(torch.randn(2, 8))
        assert _counts(c) == (64 + 2 * 4 * 4, 0)
    d = abfp.to_digital(m, inplace=False)
    assert "_compiled_call_impl" not in d.__dict__ and d._compiled_call_impl is None
    assert "_compiled_call_impl" not in abfp.to_digital(m).__dict__


# ----------------------------------------------------------------------------- 2. methods that multiply their arguments
def _keep(fn):
    """A decorator that keeps the function's name (``functools.wraps``)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **k):
        return fn(*a, **k)

    return wrapper


class Scorer(nn.Module):
    """Public methods that compute products of their arguments without naming the module's layers."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, a, b):
        return self.scores(self.proj(a), b)  # inside the forward: the plain method, the frame's products

    def scores(self, a, b):
        return a @ b.T

    def attend(self, a, b):
        return torch.einsum("ik,jk->ij", a, b)

    @_keep
    def batched(self, a, b):
        return [torch.bmm(u[None], v.T[None])[0] for u, v in [(a, b)]]  # inside a comprehension

    def describe(self):
        return f"scorer of width {4}"  # no product: not wrapped


def _flop_macs(fn, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn(*args)
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("method", ["scores", "attend", "batched"])
def test_methods_that_multiply_their_arguments_run_on_the_device(method):
    """Called from outside any forward, each runs as ``forward`` does: on the device, counted as
    FlopCounterMode counts the float32 method (before the fix: 0 MACs, float32)."""
    torch.manual_seed(3)
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    model = Scorer().eval()
    want = _flop_macs(getattr(model, method), a, b)
    m = abfp.convert(model, CFG)
    assert isinstance(m.__dict__.get(method), abfp.nn.mode.GuardedMethod)
    with torch.no_grad():
        y = getattr(m, method)(a, b)
    y = y[0] if isinstance(y, list) else y
    assert _counts(m) == (want, 0) and want == 3 * 5 * 4
    _on_device(y, a, b.T)


class FcW(nn.Module):
    """A Linear(4, 4) and a 4 x 4 buffer ``w`` for the products of its subclasses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("w", torch.randn(4, 4))

    def forward(self, x):
        return self.fc(x)


class Streamer(FcW):

    def stream(self, xs):
        for x in xs:
            h = self.fc(x)
            yield h, h @ self.w
        return "done"


def test_a_generator_method_runs_each_step_on_the_device():
    """A generator method's body runs between ``next`` calls, after the wrapper returned: its own
    products (``h @ self.w``) ran in float32 uncounted (96 of 192 MACs); each step now runs in the
    module's frame. Closing it early leaves no frame behind."""
    torch.manual_seed(8)
    m = abfp.convert(Streamer(), CFG)
    xs = [torch.randn(2, 4) for _ in range(3)]
    with torch.no_grad():
        out = list(m.stream(xs))
    assert _counts(m) == (3 * 2 * (16 + 16), 0)
    _on_device(out[0][1], out[0][0], m.w)
    gen = m.stream(xs)
    next(gen)
    gen.close()
    assert not abfp.nn.mode._stack()
    with pytest.raises(StopIteration) as end:
        g = m.stream([])
        next(g)
    assert end.value.value == "done"


def test_method_heuristic_wraps_no_plain_method_and_no_torch_method():
    m = abfp.convert(nn.Sequential(Scorer(), nn.MultiheadAttention(4, 2), nn.Bilinear(4, 4, 2)), CFG)
    assert "describe" not in m[0].__dict__ and m[0].describe() == "scorer of width 4"
    for mod in (m, m[1], m[2]):  # torch's own classes and nn.Module's methods are never wrapped
        assert not [k for k, v in mod.__dict__.items() if isinstance(v, abfp.nn.mode.GuardedMethod)]
    # inside a forward the method is the plain one: the forward's site numbering
    one = abfp.convert(Scorer(), CFG)
    with torch.no_grad():
        s = abfp.summary(one, (torch.randn(3, 4), torch.randn(5, 4)))
    assert [r.site for r in s.rows] == ["proj:linear0", ":matmul0"]


# ----------------------------------------------------------------------------- 3. linear algebra inside LAPACK
def _linalg_cases():
    """name -> (call, the digital op's name, its MACs by the estimate of ops/coverage, written out
    here for a batch of 2 systems of n = 4 with k = 3 right-hand sides)."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 4, 4, generator=g) + 4 * torch.eye(4)
    b = torch.randn(2, 4, 3, generator=g)
    spd = a @ a.mT
    low = torch.linalg.cholesky(spd)
    lu, piv = torch.linalg.lu_factor(a)
    refl, tau = torch.geqrf(b)
    s = torch.ceil(torch.log2(a.abs().sum(-2).amax(-1).double() / 3.010066362817634)).clamp(min=0)
    lu_n, sub = 4**3 // 3, 4 * 4 * 3  # LU of n = 4 (21), two substitutions for k = 3 (48)
    return {
        "solve": (lambda: torch.linalg.solve(a, b), "torch.linalg.solve", 2 * (lu_n + sub)),
        "solve_ex vector": (lambda: torch.linalg.solve_ex(a, b[..., 0]), "torch.linalg.solve_ex", 2 * (lu_n + 16)),
        "solve left=False": (lambda: torch.linalg.solve(a, b.mT, left=False), "torch.linalg.solve", 2 * (lu_n + sub)),
        "inv": (lambda: torch.linalg.inv(a), "torch.linalg.inv", 2 * 64),
        "Tensor.inverse": (lambda: a.inverse(), "Tensor.inverse", 2 * 64),
        "det": (lambda: torch.det(a), "torch.det", 2 * lu_n),
        "linalg.det": (lambda: torch.linalg.det(a), "torch.linalg.det", 2 * lu_n),
        "slogdet": (lambda: torch.linalg.slogdet(a), "torch.linalg.slogdet", 2 * lu_n),
        "lu_solve": (lambda: torch.linalg.lu_solve(lu, piv, b), "torch.linalg.lu_solve", 2 * sub),
        "cholesky_solve": (lambda: torch.cholesky_solve(b, low), "torch.cholesky_solve", 2 * sub),
        "triangular_solve": (lambda: torch.triangular_solve(b, low, upper=False), "torch.triangular_solve", 2 * 10 * 3),
        "solve_triangular": (lambda: torch.linalg.solve_triangular(low, b, upper=False), "torch.linalg.solve_triangular",
                             2 * 10 * 3),
        "cholesky_inverse": (lambda: torch.cholesky_inverse(low[0]), "torch.cholesky_inverse", lu_n),
        "lstsq": (lambda: torch.linalg.lstsq(a, b).solution, "torch.linalg.lstsq", 2 * ((64 - lu_n) + 48 + 24)),
        "pinv (4 x 3)": (lambda: torch.linalg.pinv(b), "torch.linalg.pinv", 2 * ((36 - 9) + 27 + 36)),
        "matrix_exp": (lambda: torch.linalg.matrix_exp(a), "torch.linalg.matrix_exp", int((5 + s).sum()) * 64),
        "Tensor.matrix_exp": (lambda: a.matrix_exp(), "Tensor.matrix_exp", int((5 + s).sum()) * 64),
        "householder_product": (lambda: torch.linalg.householder_product(refl, tau), "torch.linalg.householder_product",
                                2 * (2 * 4 * 3 * 3 - 7 * 9 + 18)),
        # decompositions: the reduction each starts with (a lower estimate)
        "cholesky": (lambda: torch.linalg.cholesky(spd), "torch.linalg.cholesky", 2 * (64 // 6)),
        "lu_factor": (lambda: torch.linalg.lu_factor(a), "torch.linalg.lu_factor", 2 * lu_n),
        "qr (4 x 3)": (lambda: torch.linalg.qr(b), "torch.linalg.qr", 2 * (36 - 9)),
        "svd (4 x 3)": (lambda: torch.linalg.svd(b), "torch.linalg.svd", 2 * (36 - 9 + 27)),
        "eigh": (lambda: torch.linalg.eigh(spd), "torch.linalg.eigh", 2 * (2 * 64 // 3)),
        "eigvals": (lambda: torch.linalg.eigvals(a), "torch.linalg.eigvals", 2 * (5 * 64 // 3)),
        # named digital before session 18: they stay so
        "cdist": (lambda: torch.cdist(b, b), "torch.cdist", 2 * 4 * 4 * 3),
        "kron": (lambda: torch.kron(a[0], a[1]), "torch.kron", 256),
        "_addmm_activation": (lambda: torch._addmm_activation(b[0, 0], a[0], b[0]), "torch._addmm_activation", 48),
    }


class Calls(nn.Module):
    def __init__(self, call) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)
        self.call = call

    def forward(self):
        return self.call()


@pytest.mark.filterwarnings("ignore:.*is deprecated:UserWarning")  # torch.triangular_solve, asked for on purpose
@pytest.mark.parametrize("case", sorted(_linalg_cases()))
def test_linear_algebra_products_are_named_and_counted_digital(case):
    """Each ran in float32 unsaid and counted 0 MACs until session 18: now one
    ``DigitalProductWarning`` naming the op (once per model), its estimated MACs digital, torch's
    own result; inside an excluded module the same MACs, no warning."""
    call, name, macs = _linalg_cases()[case]
    want = call()
    m = abfp.convert(Calls(call), CFG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DigitalProductWarning)
        got, _ = m(), m()
    said = [str(w.message) for w in caught if issubclass(w.category, DigitalProductWarning)]
    assert len(said) == 1 and said[0].startswith(f"abfp: {name} (in the model)"), said
    assert abfp.coverage(m).digital_ops == {f"{name} (no analog model)": 2 * macs}
    for u, v in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(u, v)
    x = abfp.convert(Calls(call), CFG, exclude=[""])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DigitalProductWarning)
        x()
    assert not caught and abfp.coverage(x).digital_ops == {f"{name} (no analog model)": macs}


def test_weight_preparation_by_matrix_exp_stays_quiet():
    """An orthogonal parametrization (``matrix_exp`` of a skew matrix) prepares a weight: it runs
    before the device, digital, neither named nor counted (as a deployed model's weights are)."""
    lin = torch.nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))
    m = abfp.convert(nn.Sequential(lin), CFG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DigitalProductWarning)
        m(torch.randn(2, 4))
    assert not caught and _counts(m) == (2 * 4 * 4, 0)


# ----------------------------------------------------------------------------- 5. other products found by probing
def _other_cases():
    """name -> (call, the digital op's name, its MACs): products that ran unsaid until session 18."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 4, generator=g), torch.randn(4, 5, generator=g)
    z = x.to(torch.complex64)
    w8 = torch.randint(-8, 8, (5, 4), dtype=torch.int8, generator=g)
    cases = {
        # weight-only quantised GEMMs (int8 weights, packed float16): K = 4 MACs per output of (3, 5)
        "_weight_int8pack_mm": (lambda: torch._weight_int8pack_mm(x, w8, torch.ones(5)), "torch._weight_int8pack_mm", 60),
        # what F.bilinear calls, called directly: one MAC per point of (3, 2, 4, 4)
        "_trilinear": (lambda: torch._trilinear(x, torch.ones(2, 4, 4), x, [1, 3], [0], [1, 2], [2, 3]),
                       "torch._trilinear", 96),
        # complex vector products (a complex matmul was named already): no DAC encodes them
        "dot complex": (lambda: torch.dot(z[0], z[1]), "torch.dot on complex64 operands", 4),
        "vdot complex": (lambda: torch.vdot(z[0], z[1]), "torch.vdot on complex64 operands", 4),
        "vecdot complex": (lambda: torch.linalg.vecdot(z, z), "torch.linalg.vecdot on complex64 operands", 12),
        # a loss of dot products computed inside ATen: one x1 . x2 of K = 4 per row
        "cosine_embedding_loss": (lambda: torch.nn.functional.cosine_embedding_loss(x, x.flip(0), torch.ones(3)),
                                  "torch.nn.functional.cosine_embedding_loss", 12),
        # a negative power: the inverse (n^3 = 64) and A^-1 cubed (two products of 64)
        "matrix_power -3": (lambda: torch.linalg.matrix_power(torch.eye(4) * 2 + 0.1, -3),
                            "torch.linalg.matrix_power with n < 0", 64 + 2 * 64),
    }
    if "fbgemm" in torch.backends.quantized.supported_engines:
        cases["fbgemm_linear_fp16_weight"] = (
            lambda: torch.fbgemm_linear_fp16_weight(x, torch.fbgemm_pack_gemm_matrix_fp16(w.T.contiguous()),
                                                    torch.zeros(5)), "torch.fbgemm_linear_fp16_weight", 60)
    return cases


@pytest.mark.filterwarnings("ignore:.*is deprecated:UserWarning")  # torch's fbgemm float16 kernels, on purpose
@pytest.mark.parametrize("case", sorted(_other_cases()))
def test_other_unsaid_products_are_named_and_counted(case):
    call, name, macs = _other_cases()[case]
    want = call()
    m = abfp.convert(Calls(call), CFG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DigitalProductWarning)
        got = m()
    said = [str(w.message) for w in caught if issubclass(w.category, DigitalProductWarning)]
    assert len(said) == 1 and said[0].startswith(f"abfp: {name} (in the model)"), said
    assert abfp.coverage(m).digital_ops == {f"{name} (no analog model)": macs}
    torch.testing.assert_close(got, want)


def test_products_in_a_custom_autograd_function_are_on_the_device():
    """Checked and fine: an ``autograd.Function``'s forward runs under the converted frame."""

    class Times(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a @ b

        @staticmethod
        def backward(ctx, g):
            return None, None

    a, b = torch.randn(3, 4), torch.randn(4, 5)
    seen = {}
    m = abfp.convert(Calls(lambda: seen.setdefault("y", Times.apply(a, b))), CFG)
    m()
    assert _counts(m) == (60, 0)
    _on_device(seen["y"], a, b)


class Branches(FcW):
    """``torch.cond`` and ``while_loop`` with products in their branch and body."""

    def forward(self, x):
        from torch._higher_order_ops import while_loop

        h = self.fc(x)
        y = torch.cond(h.sum() > -1e9, lambda u: u @ self.w, lambda u: u @ self.w.T, (h,))
        _, z = while_loop(lambda i, v: i < 3, lambda i, v: (i + 1, v @ self.w), (torch.tensor(0), y))
        return z


def test_control_flow_branches_run_on_the_device():
    """torch runs ``torch.cond``/``while_loop`` through ``torch.compile`` even in eager mode: their
    products ran in float32, unnamed and uncounted (the model counted its Linear's 32 MACs of 160).
    Now every product of the branch and of the three loop steps is on the device; excluded, the same
    MACs count as digital and the output is float32's."""
    torch.manual_seed(7)
    x = torch.randn(2, 4)
    model = Branches().eval()
    with torch.no_grad():
        want = model(x)
        m = abfp.convert(model, CFG)
        y = m(x)
        assert _counts(m) == (32 + 4 * 32, 0)
        h = m.fc(x)
        step = h
        for _ in range(4):  # the branch, then three loop steps: each one device product
            nxt = abfp.functional.matmul(step, model.w, config=CFG)
            _on_device(nxt, step, model.w)
            step = nxt
        torch.testing.assert_close(y, step, rtol=0, atol=0)
        assert not torch.allclose(y, want, atol=1e-3)
        xm = abfp.convert(model, CFG, exclude=[""])
        torch.testing.assert_close(xm(x), want)
        assert _counts(xm) == (0, 32 + 4 * 32)


def test_scan_and_map_bodies_run_on_the_device():
    """``torch._higher_order_ops.scan`` and ``map``, compiled by torch in eager mode too: 0 MACs
    before; now each step's product is a device product."""
    from torch._higher_order_ops import map as hop_map, scan

    w, x = torch.randn(4, 4), torch.randn(3, 2, 4)
    m = abfp.convert(Calls(lambda: scan(lambda c, xi: (c @ w, xi.sum(-1)), x[0], x, dim=0)[0]), CFG)
    m()
    assert _counts(m) == (3 * 2 * 4 * 4, 0)
    seen = []
    m = abfp.convert(Calls(lambda: hop_map(lambda xi: seen.append((xi, xi @ w)) or seen[-1][1], x)), CFG)
    m()
    assert _counts(m) == (3 * 2 * 4 * 4, 0)
    _on_device(seen[0][1], seen[0][0], w)

