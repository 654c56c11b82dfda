"""Every matrix-product function torch offers runs on the device inside a converted module,
agrees with a float64 evaluation of SPEC section 1 of the same (A, B) products, counts its true
MACs, and anything product-like without an analog model is named and counted (coverage)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import abfp
from abfp import ABFPConfig
from abfp.numerics import reference_product
from abfp.ops.coverage import DigitalProductWarning

# coarse device: clearly different from float32; noise off so the oracle is exact
CFG = ABFPConfig(tile_width=8, input_bits=4, weight_bits=4, output_bits=5, gain=2.0, noise_std=0.0)


def oracle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 SPEC product ``a @ b`` for 2-D a (M, K), b (K, N)."""
    return reference_product(a.double(), b.double().T.contiguous(), CFG).y[0]


class Call(nn.Module):
    """A module whose forward is one call of ``fn`` (so that it can be converted)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def run(fn, *xs, cfg=CFG):
    m = abfp.convert(Call(fn), cfg)
    s = abfp.summary(m, xs)
    y = m(*xs)
    return y, s


def close(y, ref):
    torch.testing.assert_close(y.double(), ref.double(), rtol=1e-5, atol=1e-5)


g = torch.Generator().manual_seed(0)
A = torch.randn(5, 20, generator=g)
B = torch.randn(20, 7, generator=g)
C = torch.randn(5, 7, generator=g)
v = torch.randn(20, generator=g)


def test_addmm_both_spellings_and_scalars():
    for fn in (lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0),
               lambda c, a, b: c.addmm(a, b, beta=0.5, alpha=2.0)):
        y, s = run(fn, C, A, B)
        close(y, 0.5 * C.double() + 2.0 * oracle(A, B))
        assert s.device_mac_share == 1.0
        assert s.analog_macs == 5 * 7 * 20
    assert not torch.allclose(run(lambda c, a, b: torch.addmm(c, a, b), C, A, B)[0], torch.addmm(C, A, B), atol=1e-3)


def test_addmm_with_parameter_weight_is_a_linear_site():
    class GPT2Conv1D(nn.Module):  # Hugging Face GPT-2's Conv1D: weight (nx, nf), y = addmm(b, x, W)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(20, 7))
            self.bias = nn.Parameter(torch.randn(7))

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], 7)

    mod = GPT2Conv1D()
    x = torch.randn(2, 3, 20)
    m = abfp.convert(mod, CFG)
    s = abfp.summary(m, x)
    with torch.no_grad():
        y = m(x)
        ref = oracle(x.reshape(-1, 20), mod.weight).reshape(2, 3, 7) + mod.bias.double()
    close(y, ref)
    assert [r.kind for r in s.rows] == ["linear"] and s.rows[0].macs == 6 * 7 * 20


def test_mv_addmv_dot_inner_outer_addr():
    M = torch.randn(6, 20, generator=g)
    close(run(torch.mv, M, v)[0], oracle(M, v.unsqueeze(1)).squeeze(1))
    close(run(lambda m, x: m.mv(x), M, v)[0], oracle(M, v.unsqueeze(1)).squeeze(1))
    c6 = torch.randn(6, generator=g)
    close(run(lambda c, m, x: torch.addmv(c, m, x, beta=2.0), c6, M, v)[0], 2 * c6.double() + oracle(M, v.unsqueeze(1)).squeeze(1))
    w = torch.randn(20, generator=g)
    close(run(torch.dot, v, w)[0], oracle(v.unsqueeze(0), w.unsqueeze(1)).reshape(()))
    X = torch.randn(3, 4, 20, generator=g)
    Y = torch.randn(2, 20, generator=g)
    close(run(torch.inner, X, Y)[0], oracle(X.reshape(12, 20), Y.T).reshape(3, 4, 2))
    a, b = torch.randn(5, generator=g), torch.randn(4, generator=g)
    close(run(torch.outer, a, b)[0], oracle(a.unsqueeze(1), b.unsqueeze(0)))
    c54 = torch.randn(5, 4, generator=g)
    close(run(torch.addr, c54, a, b)[0], c54.double() + oracle(a.unsqueeze(1), b.unsqueeze(0)))


def test_addbmm_baddbmm_with_out():
    b1 = torch.randn(3, 4, 20, generator=g)
    b2 = torch.randn(3, 20, 6, generator=g)
    c = torch.randn(4, 6, generator=g)
    per = torch.stack([oracle(b1[i], b2[i]) for i in range(3)])
    close(run(lambda c, x, y: torch.addbmm(c, x, y, alpha=0.5), c, b1, b2)[0], c.double() + 0.5 * per.sum(0))
    out = torch.empty(0)
    y, _ = run(lambda c, x, y: torch.baddbmm(c, x, y, out=out), c, b1, b2)
    assert y is out
    close(out, c.double() + per)


def test_tensordot_and_linalg():
    a = torch.randn(3, 4, 5, generator=g)
    b = torch.randn(5, 4, 6, generator=g)
    y, s = run(lambda x, z: torch.tensordot(x, z, dims=([1, 2], [1, 0])), a, b)
    ref = oracle(a.reshape(3, 20), b.permute(1, 0, 2).reshape(20, 6))
    close(y, ref)
    assert s.analog_macs == 3 * 6 * 20
    b1 = torch.randn(5, 2, generator=g)
    close(run(lambda x, z: torch.tensordot(x, z, dims=1), a, b1)[0], oracle(a.reshape(12, 5), b1).reshape(3, 4, 2))
    close(run(torch.linalg.matmul, A, B)[0], oracle(A, B))
    x, z = torch.randn(4, 3, 20, generator=g), torch.randn(3, 20, generator=g)
    y, s = run(lambda p, q: torch.linalg.vecdot(p, q, dim=-1), x, z)
    ref = torch.stack([torch.stack([oracle(x[i, j:j + 1], z[j:j + 1].T)[0, 0] for j in range(3)]) for i in range(4)])
    close(y, ref)
    assert s.analog_macs == 4 * 3 * 20


@pytest.mark.parametrize("shapes,plan", [
    (((4, 20), (20, 9), (9, 3)), (0, (1, 2))),           # A(BC): 20*9*3 + 4*20*3 = 780 < (AB)C 4*20*9 + 4*9*3 = 828
    (((4, 20), (20, 9), (9, 30)), ((0, 1), 2)),          # (AB)C: 720 + 1080 < 5400 + 2400
    (((3, 4), (4, 5), (5, 6)), ((0, 1), 2)),             # a tie-free (AB)C
    (((6, 2), (2, 7), (7, 1), (1, 5)), ((0, (1, 2)), 3)),  # four: torch's dynamic programme
])
def test_multi_dot_and_chain_in_torchs_order(shapes, plan):
    """``multi_dot``/``chain_matmul`` multiply in torch's order (the fewest MACs), each pairwise
    product on the device; they multiplied left to right, up to 10x the MACs of the float32 model
    (``(10, 1), (1, 10), (10, 1)``: 200 device MACs where torch does 20)."""
    mats = [torch.randn(sh, generator=g) for sh in shapes]

    def oracle_plan(p):
        return mats[p].double() if isinstance(p, int) else oracle(oracle_plan(p[0]).float(), oracle_plan(p[1]).float())

    def macs(p):  # rows x columns x inner size of every pairwise product of the plan
        if isinstance(p, int):
            return 0, shapes[p][0], shapes[p][1]
        ma, r, k = macs(p[0])
        mb, _, c = macs(p[1])
        return ma + mb + r * k * c, r, c

    with FlopCounterMode(display=False) as fc:  # torch's own order costs what the plan costs
        torch.linalg.multi_dot(mats)
    assert fc.get_total_flops() == 2 * macs(plan)[0]
    ref = oracle_plan(plan)
    y, s = run(lambda *ms: torch.linalg.multi_dot(list(ms)), *mats)
    close(y, ref)
    assert s.coverage.analog_macs == macs(plan)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates chain_matmul
        y, s = run(lambda *ms: torch.chain_matmul(*ms), *mats)
    close(y, ref)
    assert s.coverage.analog_macs == macs(plan)[0]


def test_einsum_two_and_three_operands_with_true_macs():
    a = torch.randn(2, 5, 20, generator=g)
    b = torch.randn(2, 20, 6, generator=g)
    y, s = run(lambda x, z: torch.einsum("bik,bkj->bij", x, z), a, b)
    close(y, torch.stack([oracle(a[i], b[i]) for i in range(2)]))
    assert s.analog_macs == 2 * 5 * 6 * 20  # was 0 before
    m1, m2, m3 = torch.randn(4, 20, generator=g), torch.randn(20, 9, generator=g), torch.randn(9, 3, generator=g)
    y, s = run(lambda p, q, r: torch.einsum("ij,jk,kl->il", p, q, r), m1, m2, m3)
    close(y, oracle(oracle(m1, m2).float(), m3))
    assert s.analog_macs == 4 * 9 * 20 + 4 * 3 * 9
    assert s.device_mac_share == 1.0
    # one operand: a transpose, not a product: digital without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", DigitalProductWarning)
        torch.testing.assert_close(run(lambda p: torch.einsum("ij->ji", p), m1)[0], m1.T)


def test_einsum_index_repeated_within_an_operand_takes_its_diagonal():
    """``ii,ij->j`` (a trace-like operand) and ``iji,jk->ik``: the repeated index selects the
    diagonal (digital, a selection) and the contraction is one device product."""
    g = torch.Generator().manual_seed(5)  # its own data: the module's generator feeds the later tests
    sq, m2 = torch.randn(20, 20, generator=g), torch.randn(20, 6, generator=g)
    y, s = run(lambda p, q: torch.einsum("ii,ij->j", p, q), sq, m2)
    close(y, oracle(torch.diagonal(sq)[None], m2)[0])
    assert s.analog_macs == 6 * 20 and s.device_mac_share == 1.0
    t3 = torch.randn(4, 20, 4, generator=g)
    y, s = run(lambda p, q: torch.einsum("iji,jk->ik", p, q), t3, m2)
    close(y, oracle(torch.diagonal(t3, 0, 0, 2).T, m2))
    assert s.analog_macs == 4 * 6 * 20
    y, _ = run(lambda p, q, r: torch.einsum("ii,ij,jkk->k", p, q, r), sq, m2, torch.randn(6, 3, 3, generator=g))
    assert y.shape == (3,)


@pytest.mark.parametrize("shapes,dim", [(((5, 16), (1, 16)), -1), (((2, 16, 3), (2, 16, 3)), 1)], ids=["broadcast", "dim1"])
def test_cosine_similarity_is_a_device_dot_product(shapes, dim):
    """``F.cosine_similarity`` (and ``nn.CosineSimilarity``, the same call): torch divides each
    operand by its norm along ``dim`` (at least ``eps``) and sums the products; the division stays
    digital, the dot products are device products, ``K`` = the size of ``dim``, checked against the
    float64 SPEC product of the normalised operands (it ran in float32 unnamed and uncounted)."""
    x1, x2 = (torch.randn(sh, generator=g) for sh in shapes)
    x1[0].zero_()  # a zero vector: its norm is eps, its cosine 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", DigitalProductWarning)
        y, s = run(lambda a, b: F.cosine_similarity(a, b, dim=dim), x1, x2)
        m = abfp.convert(nn.CosineSimilarity(dim=dim), CFG)
        torch.testing.assert_close(m(x1, x2), y, rtol=0, atol=0)
    a, b = torch.broadcast_tensors(x1, x2)
    a, b = (t / torch.linalg.vector_norm(t, dim=dim, keepdim=True).clamp_min(1e-8) for t in (a, b))
    a, b = a.movedim(dim, -1).reshape(-1, a.shape[dim]), b.movedim(dim, -1).reshape(-1, b.shape[dim])
    ref = torch.stack([oracle(a[i:i + 1], b[i].unsqueeze(1))[0, 0] for i in range(a.shape[0])]).reshape(y.shape)
    close(y, ref)
    assert s.analog_macs == y.numel() * 16 and s.device_mac_share == 1.0
    assert not torch.allclose(y, F.cosine_similarity(x1, x2, dim=dim), atol=1e-3)  # the device, not float32


@pytest.mark.parametrize("pad", [0, 2])
def test_conv_tbc_is_a_device_convolution(pad):
    """``torch.conv_tbc`` (fairseq's ConvTBC, time x batch x channels) runs as the device's 1-D
    convolution, reduction axis ``(c, j)`` as conv1d's: against the float64 SPEC product of its
    patches (it ran in float32, named as having no analog model)."""
    x, w, b = torch.randn(9, 2, 6, generator=g), torch.randn(3, 6, 5, generator=g), torch.randn(5, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DigitalProductWarning)
        y, s = run(lambda a, c, d: torch.conv_tbc(a, c, d, pad), x, w, b)
    xp = F.pad(x.permute(1, 2, 0), (pad, pad))  # (B, C, T + 2 pad)
    t_out = xp.shape[2] - 3 + 1
    patches = torch.stack([xp[:, :, t:t + 3].reshape(2, 18) for t in range(t_out)], 0).reshape(-1, 18)  # rows (t, b), K (c, j)
    ref = oracle(patches, w.permute(1, 0, 2).reshape(18, 5)).reshape(t_out, 2, 5) + b.double()
    assert y.shape == torch.conv_tbc(x, w, b, pad).shape
    close(y, ref)
    assert s.analog_macs == y.numel() * 18 and s.device_mac_share == 1.0


def test_matrix_power_is_device_products_in_torchs_order():
    """``A^n`` by torch's binary exponentiation, each product on the device (it ran in float32,
    named): ``A^2 = A A``; ``A^3 = A (A A)``; ``A^5 = A ((A A)(A A))``, each product against the float64
    SPEC product of the float32 operands the device met; ``floor(log2 n) + popcount(n) - 1`` products
    of ``m^3`` MACs; ``n = 1`` and ``n = 0`` are no products."""
    a = torch.randn(7, 7, generator=g) / 3
    f = lambda u, w: oracle(u, w).float()  # noqa: E731  (the device's float32 output)
    sq = f(a, a)
    for n, ref, products in ((2, sq, 1), (3, f(a, sq), 2), (5, f(a, f(sq, sq)), 3)):
        for fn in (lambda x: torch.linalg.matrix_power(x, n), lambda x: x.matrix_power(n), lambda x: torch.matrix_power(x, n)):
            with warnings.catch_warnings():
                warnings.simplefilter("error", DigitalProductWarning)
                y, s = run(fn, a)
            close(y, ref)
            assert s.analog_macs == products * 7 ** 3 and s.device_mac_share == 1.0
    for n in (0, 1):
        y, s = run(lambda x: torch.linalg.matrix_power(x, n), a)
        torch.testing.assert_close(y, torch.linalg.matrix_power(a, n))
        assert s.analog_macs == 0


def test_bilinear_two_products():
    bl = nn.Bilinear(6, 5, 4)
    x1, x2 = torch.randn(3, 6, generator=g), torch.randn(3, 5, generator=g)
    m = abfp.convert(bl, CFG)
    s = abfp.summary(m, (x1, x2))
    with torch.no_grad():
        y = m(x1, x2)
        W = bl.weight  # (4, 6, 5)
        u = oracle(x1, W.permute(0, 2, 1).reshape(20, 6).T).reshape(3, 4, 5).float()
        ref = torch.stack([oracle(u[i], x2[i].unsqueeze(1))[:, 0] for i in range(3)]) + bl.bias.double()
    close(y, ref)
    assert sorted(r.kind for r in s.rows) == ["linear", "matmul"]
    assert s.analog_macs == 3 * 4 * 5 * 6 + 3 * 4 * 5


def test_gradients_flow_through_new_products():
    a = torch.randn(5, 20, requires_grad=True)
    b = torch.randn(20, 7, requires_grad=True)
    c = torch.randn(7, requires_grad=True)
    m = abfp.convert(Call(lambda c, a, b: torch.addmm(c, a, b)), CFG)
    m(c, a, b).square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (a, b, c))


def test_unsupported_product_is_named_once_per_model_and_counted():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 8)

        def forward(self, x):
            h = self.fc(x)
            return torch.cdist(h, h)  # no analog model

    x = torch.randn(6, 20)
    for _ in range(2):  # a second converted model warns again (not once per process)
        m = abfp.convert(Net(), CFG)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            s = abfp.summary(m, x)
            m(x)
        msgs = [str(x.message) for x in w if issubclass(x.category, DigitalProductWarning)]
        assert len(msgs) == 1 and "cdist" in msgs[0], msgs
        assert s.analog_macs == 6 * 8 * 20
        digital = [r for r in s.rows if r.kind == "digital"]
        assert len(digital) == 1 and digital[0].macs == 6 * 6 * 8
        assert s.device_mac_share == pytest.approx(960 / (960 + 288))
        assert "cdist" in str(s)


def test_in_place_forms_run_on_the_device_like_their_out_of_place_forms():
    """``t.addmm_(a, b)`` and the other in-place forms: the out-of-place form's device numbers and
    MACs, written into ``t`` (they used to run in float32 without a word)."""
    g = torch.Generator().manual_seed(6)
    c, a, b, v = torch.randn(5, 7, generator=g), A, B, torch.randn(20, generator=g)
    pairs = [(lambda t, p, q: t.clone().addmm_(p, q, beta=0.5, alpha=2), lambda t, p, q: torch.addmm(t, p, q, beta=0.5, alpha=2)),
             (lambda t, p, q: t[None].clone().baddbmm_(p[None], q[None]), lambda t, p, q: torch.baddbmm(t[None], p[None], q[None])),
             (lambda t, p, q: t.clone().addbmm_(p[None], q[None]), lambda t, p, q: torch.addbmm(t, p[None], q[None])),
             (lambda t, p, q: t[:, 0].clone().addmv_(p, v), lambda t, p, q: torch.addmv(t[:, 0], p, v)),
             (lambda t, p, q: t.clone().addr_(p[:, 0], q[0]), lambda t, p, q: torch.addr(t, p[:, 0], q[0]))]
    for in_place, out_of_place in pairs:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DigitalProductWarning)
            y, s = run(in_place, c, a, b)
        ref, s_ref = run(out_of_place, c, a, b)
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
        assert s.analog_macs == s_ref.analog_macs > 0 and s.device_mac_share == 1.0
        assert not torch.allclose(y, out_of_place(c, a, b), rtol=1e-3, atol=1e-3)  # the device, not float32
    with pytest.raises(RuntimeError, match="Bad in-place call"):
        run(lambda t, p, q: t[0].clone().addmm_(p, q), c, a, b)


@pytest.mark.parametrize("fn,macs", [(lambda p, q: torch.kron(p, q), 5 * 20 * 20 * 7),
                                     (lambda p, q: p.kron(q), 5 * 20 * 20 * 7),
                                     (lambda p, q, t=A[:2, :6].reshape(2, 2, 3): F.affine_grid(t, [2, 1, 5, 7]), 2 * 5 * 7 * 2 * 3),
                                     (lambda p, q, t=A[:3, :8].reshape(2, 3, 4): F.affine_grid(t, [2, 1, 2, 3, 4]),
                                      2 * 2 * 3 * 4 * 3 * 4)],
                         ids=["torch.kron", "Tensor.kron", "F.affine_grid", "F.affine_grid-3d"])
def test_products_without_analog_model_are_named_and_their_macs_counted(fn, macs):
    """kron (each output one product of two elements) and a spatial transformer's
    ``affine_grid`` (each coordinate a base-grid row times ``theta``: ``K`` = 3, 3-D 4) stay
    float32, named by the name users call them by, with their MACs in the digital share (they
    counted 0 before; affine_grid was not even named)."""
    m = abfp.convert(Call(fn), CFG)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m(A, B)
    names = [str(x.message) for x in w if issubclass(x.category, DigitalProductWarning)]
    name = fn.__code__.co_names[-1]
    assert len(names) == 1 and f"{name} (in" in names[0] and "_VariableFunctions" not in names[0], names
    assert abfp.coverage(m).digital_macs == macs and abfp.coverage(m).share == 0.0


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_products_of_integer_or_complex_operands_stay_digital_and_are_named(dtype):
    """No DAC encodes integers or complex numbers: such a product runs as torch computes it, named
    (with its dtype) in the warning and counted as digital (it used to raise a TypeError)."""
    a, b = (torch.randint(-5, 5, (5, 20)), torch.randint(-5, 5, (20, 7))) if dtype == torch.int64 else (
        torch.randn(5, 20, dtype=dtype), torch.randn(20, 7, dtype=dtype))
    m = abfp.convert(Call(lambda p, q, r: (torch.matmul(p, q), torch.nn.functional.linear(r, q.T.real.float()))), CFG)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y, lin = m(a, b, A)
    assert torch.equal(y, a @ b)
    name = f"torch.matmul on {str(dtype).replace('torch.', '')} operands"
    assert [str(x.message).split(" (in")[0] for x in w if issubclass(x.category, DigitalProductWarning)] == ["abfp: " + name]
    cov = abfp.coverage(m)
    assert cov.digital_ops == {f"{name} (no analog model)": 5 * 7 * 20} and cov.analog_macs == 5 * 7 * 20


_gs = torch.Generator().manual_seed(7)  # its own: the module's g draws the other tests' data
_S = A * (torch.rand(5, 20, generator=_gs) < 0.3)  # a sparse operand's values (a graph's adjacency, ...)
_MASK = (torch.rand(5, 7, generator=_gs) < 0.4).float()


@pytest.mark.parametrize("fn,name,macs", [
    (lambda s, b, c: s.to_sparse() @ b, "Tensor.matmul on sparse_coo operands", 5 * 7 * 20),
    (lambda s, b, c: torch.mm(s.to_sparse(), b), "torch.mm on sparse_coo operands", 5 * 7 * 20),
    (lambda s, b, c: torch.matmul(s.to_sparse_csr(), b), "torch.matmul on sparse_csr operands", 5 * 7 * 20),
    (lambda s, b, c: F.linear(s.to_sparse(), b.T), "torch.linear on sparse_coo operands", 5 * 7 * 20),
    (lambda s, b, c: torch.bmm(s[None].to_sparse(), b[None]), "torch.bmm on sparse_coo operands", 5 * 7 * 20),
    (lambda s, b, c: torch.addmm(c, s.to_sparse(), b), "torch.addmm on sparse_coo operands", 5 * 7 * 20),
    (lambda s, b, c: torch.sparse.mm(s.to_sparse(), b), "torch.sparse.mm", 5 * 7 * 20),
    (lambda s, b, c: torch.sparse.addmm(c, s.to_sparse(), b), "torch.sparse.addmm", 5 * 7 * 20),
    (lambda s, b, c: torch.sparse.sampled_addmm(_MASK.to_sparse_csr(), s, b).to_dense(), "torch.sparse.sampled_addmm",
     int(_MASK.sum()) * 20)],
    ids=["matmul-op", "mm", "matmul-csr", "linear", "bmm", "addmm", "sparse.mm", "sparse.addmm", "sampled_addmm"])
def test_products_of_sparse_operands_stay_digital_and_are_named(fn, name, macs):
    """A sparse operand (a GCN's ``adj @ h``): no DAC encodes a sparse tensor, so the product runs as
    torch's sparse kernel computes it, named (with the layout) in the warning and counted as digital,
    as a dense product of its shape (``sampled_addmm``: the outputs it computes, ``K`` MACs each).
    ``adj @ h`` used to raise ``expand is unsupported for Sparse tensors`` where torch runs it, and
    ``torch.sparse.mm`` was named but counted 0 MACs (a 100 % device share)."""
    m = abfp.convert(Call(fn), CFG)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = m(_S, B, C)
    torch.testing.assert_close(y.to_dense() if y.layout != torch.strided else y, fn(_S, B, C).to_dense())
    assert [str(x.message).split(" (in")[0] for x in w if issubclass(x.category, DigitalProductWarning)] == ["abfp: " + name]
    cov = abfp.coverage(m)
    assert cov.digital_ops == {f"{name} (no analog model)": macs} and cov.analog_macs == 0


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
def test_nested_inputs_of_a_linear_layer_run_on_the_device(layout):
    """A nested tensor (variable-length sequences) into ``nn.Linear`` (and, jagged, ``nt @ W``): each
    row is its own product, so the rows run on the device as one dense input and come back nested,
    each component what the layer gives that component alone (it raised inside abfp:
    ``NestedTensorImpl doesn't support sizes``, jagged ``cannot view shape``); gradients reach the
    weight. A product of two nested operands stays digital, named."""
    parts = [torch.randn(3, 20, generator=g), torch.randn(5, 20, generator=g)]
    lin = nn.Linear(20, 7)
    w = torch.randn(20, 7, generator=g)
    fns = [lambda t: lin(t)] + ([lambda t: t @ w] if layout == torch.jagged else [])
    for fn in fns:
        m = abfp.convert(Call(fn), CFG)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DigitalProductWarning)
            with torch.no_grad():
                y = m(torch.nested.nested_tensor(parts, layout=layout))
                dense = [m(p) for p in parts]
        assert y.is_nested and y.layout == layout
        for yi, di in zip(y.unbind(), dense):
            torch.testing.assert_close(yi, di, rtol=0, atol=0)
        assert abfp.coverage(m).analog_macs == 2 * 8 * 7 * 20 and abfp.coverage(m).digital_macs == 0
    nt = torch.nested.nested_tensor(parts, layout=layout, requires_grad=True)
    m = abfp.convert(lin, CFG)
    y = m(nt)
    (y.values() if layout == torch.jagged else torch.cat(y.unbind())).sum().backward()
    assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all() and nt.grad is not None
    if layout == torch.strided:  # nested times nested: not row by row
        m = abfp.convert(Call(lambda t, u: t @ u), CFG)
        u = torch.nested.nested_tensor([torch.randn(20, 4, generator=g)] * 2)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            with torch.no_grad():
                m(torch.nested.nested_tensor(parts), u)
        assert [str(r.message).split(" (in")[0] for r in rec if issubclass(r.category, DigitalProductWarning)] == [
            "abfp: Tensor.matmul on nested operands"]
        assert abfp.coverage(m).digital_macs == 8 * 4 * 20


def test_weighted_embedding_bag_stays_digital_and_is_named():
    """``nn.EmbeddingBag(mode="sum")(idx, per_sample_weights=w)`` (DLRM's weighted features) sums
    ``w[l] E[idx[l]]``: a sparse product with no analog model, named and counted as digital, one
    ``D``-wide product per index that is not ``padding_idx`` (it ran in float32 uncounted); without
    weights a bag is a sum of rows: no product, no warning, nothing counted."""
    bag = nn.EmbeddingBag(10, 6, mode="sum", padding_idx=0)
    idx, w = torch.tensor([[1, 2, 0], [4, 5, 6]]), torch.rand(2, 3, generator=g)
    flat, offsets = idx.flatten(), torch.tensor([0, 2])
    m = abfp.convert(Call(lambda i, p, f, o: (bag(i, per_sample_weights=p), bag(f, o, per_sample_weights=p.flatten()),
                                              bag(i))), CFG)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ys = m(idx, w, flat, offsets)
    for y, ref in zip(ys, (bag(idx, per_sample_weights=w), bag(flat, offsets, per_sample_weights=w.flatten()), bag(idx))):
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    name = "torch.nn.functional.embedding_bag with per_sample_weights"
    assert [str(x.message).split(" (in")[0] for x in rec if issubclass(x.category, DigitalProductWarning)] == ["abfp: " + name]
    cov = abfp.coverage(m)
    assert cov.digital_ops == {f"{name} (no analog model)": 2 * 5 * 6} and cov.analog_macs == 0


def test_fused_attention_kernels_called_directly_are_named_with_the_macs_of_their_modules():
    """``torch._native_multi_head_attention`` and ``torch._transformer_encoder_layer_fwd`` are the fused
    fast paths of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (which those modules do
    not take inside a converted model); called directly (or as ``torch.ops.aten``) they run in float32,
    named, with the MACs the device counts for the module (they ran unnamed and uncounted)."""
    layer = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True).eval()
    a, src = layer.self_attn, torch.randn(2, 5, 16, generator=g)
    mha_args = (src, src, src, 16, 2, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias)
    enc_args = (src, 16, 2, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias, False, False, 1e-5,
                layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias, layer.linear1.weight,
                layer.linear1.bias, layer.linear2.weight, layer.linear2.bias)
    on_device = {}
    for name, module, x in (("mha", a, (src, src, src)), ("layer", layer, (src,))):
        m = abfp.convert(module, CFG)
        with torch.no_grad():
            m(*x)
        on_device[name] = abfp.coverage(m).analog_macs
    for fn, name, key in ((lambda: torch._native_multi_head_attention(*mha_args, need_weights=False)[0],
                           "torch._native_multi_head_attention", "mha"),
                          (lambda: torch.ops.aten._native_multi_head_attention(*mha_args, need_weights=False)[0],
                           "torch.ops.aten._native_multi_head_attention", "mha"),
                          (lambda: torch._transformer_encoder_layer_fwd(*enc_args), "torch._transformer_encoder_layer_fwd",
                           "layer")):
        m = abfp.convert(Call(fn), CFG)
        with warnings.catch_warnings(record=True) as w, torch.no_grad():
            warnings.simplefilter("always")
            m()
        assert [str(x.message).split(" (in")[0] for x in w if issubclass(x.category, DigitalProductWarning)] == ["abfp: " + name]
        assert abfp.coverage(m).digital_ops == {f"{name} (no analog model)": on_device[key]} and on_device[key] > 0


def test_forward_mode_ad_is_refused_naming_the_product():
    """A dual tensor (``torch.autograd.forward_ad``) reaching a device product: the device has no
    forward-mode derivative; the error names abfp, the product and the way out (torch's own said
    'You must implement the jvp function for custom autograd.Function')."""
    import torch.autograd.forward_ad as fwAD

    m = abfp.convert(nn.Sequential(nn.Linear(20, 7)), CFG)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=r"abfp: product 0:linear0 .*forward-mode"):
        m(fwAD.make_dual(A, torch.ones_like(A)))
    with torch.no_grad():
        assert m(A).shape == (5, 7)  # outside a dual level: as always


def test_bad_input_is_refused_naming_the_product_and_module():
    net = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))
    m = abfp.convert(net, CFG)
    x = torch.randn(4, 20)
    with pytest.raises(ValueError, match=r"^abfp: product 0:linear0 \(module '0'\): input contains NaN or Inf"):
        m(x.index_fill(1, torch.tensor([3]), float("nan")))
    with torch.no_grad():
        m[2][0].weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"^abfp: product 2.0:linear0 \(module '2.0'\): weight contains NaN or Inf"):
        m(x)


def test_excluded_module_counts_as_digital():
    net = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3))
    m = abfp.convert(net, CFG, exclude=["2"])
    s = abfp.summary(m, torch.randn(4, 20))
    assert s.coverage.analog_macs == 4 * 8 * 20 and s.coverage.digital_macs == 4 * 3 * 8
    assert s.device_mac_share == pytest.approx(640 / (640 + 96))


class _Seq(nn.Module):
    def __init__(self, layer, fn):
        super().__init__()
        self.layer, self.fn = layer, fn

    def forward(self, *xs):
        return self.fn(self.layer, *xs)


_W = torch.randn(6, 8, generator=g)
_PACKED = nn.utils.rnn.pack_padded_sequence(torch.randn(3, 5, 8, generator=g), torch.tensor([5, 3, 2]),
                                            batch_first=True, enforce_sorted=False)


@pytest.mark.parametrize("layer,fn,xs", [
    (nn.LSTM(8, 12, num_layers=2, bidirectional=True, proj_size=4), lambda m, x: m(x)[0], (torch.randn(5, 3, 8, generator=g),)),
    (nn.GRU(8, 12, batch_first=True), lambda m, x: m(x)[0].data, (_PACKED,)),
    (nn.RNN(8, 12), lambda m, x: m(x)[0], (torch.randn(5, 8, generator=g),)),  # unbatched
    (nn.LSTMCell(8, 12), lambda m, x: m(x)[0], (torch.randn(3, 8, generator=g),)),
    (nn.GRUCell(8, 12), lambda m, x: m(x), (torch.randn(8, generator=g),)),
    (nn.MultiheadAttention(8, 2, kdim=6, vdim=4, add_bias_kv=True, add_zero_attn=True),
     lambda m, q, k, v: m(q, k, v)[0], (torch.randn(5, 3, 8, generator=g), torch.randn(7, 3, 6, generator=g),
                                        torch.randn(7, 3, 4, generator=g))),
    (nn.Identity(), lambda m, a, b: torch.einsum("bij,bjk,kl->bil", a, b, _W), (torch.randn(2, 3, 4, generator=g),
                                                                                 torch.randn(2, 4, 6, generator=g))),
    (nn.Identity(), lambda m, a, b: torch.tensordot(a, b, dims=([1, 2], [0, 1])), (torch.randn(3, 4, 5, generator=g),
                                                                                   torch.randn(4, 5, 2, generator=g))),
    (nn.Identity(), lambda m, a: torch.linalg.multi_dot([a, a.t(), a]), (torch.randn(3, 4, generator=g),)),
    (nn.Identity(), lambda m, a, b: a.baddbmm(batch1=a, batch2=b), (torch.randn(2, 3, 3, generator=g),
                                                                    torch.randn(2, 3, 3, generator=g))),
    (nn.Identity(), lambda m, c, a, v: torch.addmv(c, mat=a, vec=v), (torch.randn(3, generator=g),
                                                                      torch.randn(3, 4, generator=g), torch.randn(4, generator=g))),
    (nn.Identity(), lambda m, a: torch.zeros(3, 6).addmm_(a, _W.t()), (torch.randn(3, 8, generator=g),)),
    (nn.Identity(), lambda m, a: _W.t().__rmatmul__(a), (torch.randn(3, 8, generator=g),)),
    (nn.Identity(), lambda m, a: torch.outer(a, a) + torch.linalg.vecdot(a, a), (torch.randn(4, generator=g),)),
    (nn.Bilinear(8, 6, 3), lambda m, a, b: m(a, b), (torch.randn(5, 8, generator=g), torch.randn(5, 6, generator=g))),
], ids=["lstm", "gru-packed", "rnn-unbatched", "lstm-cell", "gru-cell-unbatched", "mha", "einsum", "tensordot",
        "multi_dot", "baddbmm-keywords", "addmv-keywords", "addmm_", "rmatmul", "outer-vecdot", "bilinear"])
def test_products_of_an_excluded_module_count_the_macs_the_device_would(layer, fn, xs):
    """Excluded, a call runs whole in float32 and its MACs count as digital: the same MACs the
    device counts when it runs them. LSTM, GRU, RNN and their cells, MHA, einsum, tensordot,
    multi_dot and the in-place, reflected and keyword spellings counted 0 (an excluded LSTM left the
    device MAC share at 100 %)."""
    torch.manual_seed(0)
    model = _Seq(layer, fn).eval()
    on = abfp.convert(model, CFG)
    off = abfp.convert(model, CFG, exclude=[".*"])
    with torch.no_grad():
        y = off(*xs)
        on(*xs)
        torch.testing.assert_close(y, model(*xs))  # excluded: torch's own float32 numbers
    device, digital = abfp.coverage(on), abfp.coverage(off)
    assert device.analog_macs > 0 and device.digital_macs == 0
    assert digital.analog_macs == 0 and digital.digital_macs == device.analog_macs, digital.digital_ops


def test_every_product_function_has_a_mac_count_for_its_float32_calls():
    """Every function a product family answers can run in float32 (excluded module,
    ``include_matmul=False``): each has a MAC count there (``coverage.estimate_macs``)."""
    from abfp.ops.coverage import _ESTIMATORS, func_name
    from abfp.ops.registry import registered

    assert [func_name(f) for f in registered() if f not in _ESTIMATORS] == []


def test_include_matmul_false_counts_the_float32_einsum():
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 4, 5, generator=g)
    m = abfp.convert(Call(lambda x, y: torch.einsum("bij,bjk->bik", x, y)), CFG, include_matmul=False)
    m(a, b)
    assert abfp.coverage(m).digital_macs == 2 * 3 * 4 * 5 and abfp.coverage(m).analog_macs == 0


def test_direct_aten_product_is_named():
    m = abfp.convert(Call(lambda a, b: torch.ops.aten.mm(a, b)), CFG)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = abfp.summary(m, (A, B))
    assert any("aten.mm" in str(x.message) for x in w)
    assert s.coverage.digital_macs == 5 * 7 * 20


_ATEN = torch.ops.aten


@pytest.mark.parametrize("fn,xs,macs", [
    (lambda x, w: _ATEN.conv2d(x, w), ((2, 3, 8, 8), (4, 3, 3, 3)), 2 * 4 * 6 * 6 * 27),
    (lambda x, w: _ATEN.conv_transpose2d(x, w), ((1, 4, 5, 5), (4, 3, 2, 2)), 100 * 3 * 2 * 2),
    (lambda a, b: _ATEN.einsum("ij,jk->ik", [a, b]), ((3, 4), (4, 5)), 3 * 4 * 5),
    (lambda a, b: _ATEN.tensordot(a, b, [1, 2], [0, 1]), ((3, 4, 5), (4, 5, 2)), 3 * 20 * 2),
    (lambda q, k, v: _ATEN.scaled_dot_product_attention(q, k, v), ((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8)),
     2 * 4 * 5 * (8 + 8)),
], ids=["conv2d", "conv_transpose2d", "einsum", "tensordot", "sdpa"])
def test_direct_aten_products_are_named_with_their_macs(fn, xs, macs):
    """aten products called directly stay float32, named, counted as the torch function of their
    name counts them: convolutions counted ``output x input width``, einsum 0, tensordot a wrong
    ``K``, and ``aten.scaled_dot_product_attention`` ran in float32 unnamed and uncounted."""
    m = abfp.convert(Call(fn), CFG)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m(*(torch.randn(sh, generator=g) for sh in xs))
    assert any(issubclass(x.category, DigitalProductWarning) for x in w)
    cov = abfp.coverage(m)
    assert cov.analog_macs == 0 and cov.digital_macs == macs, cov.digital_ops


def test_gpt2_runs_fully_analog():
    """Hugging Face GPT-2's Conv1D layers call torch.addmm: most of its MACs (was float32)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    m = GPT2LMHeadModel(cfg).eval()
    x = torch.randint(0, 100, (2, 16))
    cm = abfp.convert(m, ABFPConfig(tile_width=32, noise_std=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DigitalProductWarning)
        s = abfp.summary(cm, x)
    assert s.device_mac_share == 1.0
    kinds = sorted(r.kind for r in s.rows)
    assert kinds.count("linear") == 2 * 4 + 1 and kinds.count("matmul") == 2 * 2
    assert s.total_macs == 2 * 16 * (2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64) + 64 * 100) + 2 * 2 * 4 * 16 * 16 * 16 * 2
    with torch.no_grad():
        assert 1e-3 < abfp.metrics.relative_error(cm(x).logits, m(x).logits) < 0.2


def test_eval_records_and_table_report_the_device_mac_share(tmp_path):
    """abfp.evaluate: every record carries its run's device MAC share and the float32 products."""
    from abfp.evaluate import EvalSettings, evaluate
    from abfp.evaluate.runner import coverage_line
    from abfp.zoo import TOP1, Dataset

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.fc(x)
            return self.head(h) + torch.cdist(h, h)[:, :3]  # cdist: no analog model

    torch.manual_seed(0)
    data = Dataset(torch.randn(40, 20), torch.randint(0, 3, (40,)))
    recs = evaluate(Net(), data, TOP1, [CFG], settings=EvalSettings(progress=False, batch_size=40,
                                                                 cache_path=str(tmp_path / "c.sqlite")))
    (dev,) = [r for r in recs if r["format"] != "fp32"]
    analog, digital = 40 * (8 * 20 + 3 * 8), 40 * 40 * 8
    assert dev["device_mac_share"] == pytest.approx(analog / (analog + digital))
    assert list(dev["digital_ops"]) == ["torch.cdist (no analog model)"]
    assert "float32: torch.cdist" in coverage_line(recs)
    # served from the cache: the same share
    again = evaluate(Net(), data, TOP1, [CFG], settings=EvalSettings(progress=False, batch_size=40,
                                                                  cache_path=str(tmp_path / "c.sqlite")))
    assert [r for r in again if r["format"] != "fp32"][0]["device_mac_share"] == dev["device_mac_share"]


def test_a_handler_registered_after_a_call_answers_that_function():
    """The function mode remembers the functions that are no product (``abfp.ops.registry.PLAIN``,
    answered with the least Python); registering a handler later forgets them, so the new
    handler answers its function from the next call on."""
    from abfp.ops import registry

    class Tanh(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x)

    m = abfp.convert(Tanh(), ABFPConfig(tile_width=8))
    x = torch.randn(3, 5)
    assert torch.equal(m(x), torch.tanh(x)) and torch.tanh in registry.PLAIN
    calls = []

    def doubled(frame, func, args, kwargs):
        calls.append(frame.name)
        return 2 * func(*args, **kwargs)

    registry.register(torch.tanh)(doubled)
    try:
        assert torch.tanh not in registry.PLAIN
        assert torch.equal(m(x), 2 * torch.tanh(x)) and calls == [""]
    finally:
        del registry._HANDLERS[torch.tanh]
        registry.PLAIN.clear()
    assert torch.equal(m(x), torch.tanh(x)) and calls == [""]


def test_linear_with_a_one_dimensional_weight_is_one_device_row():
    # torch's F.linear takes a 1-D weight (one output, dropped); converted it raised IndexError
    X = torch.randn(3, 4, 20, generator=g)
    y, s = run(lambda x: F.linear(x, v), X)
    assert y.shape == (3, 4)
    close(y, oracle(X.reshape(12, 20), v.unsqueeze(1)).reshape(3, 4))
    assert s.device_mac_share == 1.0 and s.analog_macs == 12 * 20
    b = torch.tensor(0.5)
    y1, _ = run(lambda x: F.linear(x, v, b), A[0])
    assert y1.shape == ()
    close(y1, oracle(A[:1], v.unsqueeze(1)).reshape(()) + 0.5)
    with pytest.raises(ValueError, match="1-D weight takes a bias only"):
        run(lambda x: F.linear(x, v, b), A)


def test_include_matmul_false_keeps_products_with_a_weight_on_the_device():
    """``include_matmul=False`` keeps activation-by-activation products float32; ``x @ W``,
    ``einsum(x, W)``, ``mv(W, x)``, ``tensordot(x, W)`` with ``W`` a parameter went float32 too,
    while ``addmm(b, x, W)`` ran on the device."""
    W = nn.Parameter(B.clone())

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = W

        def forward(self, x):
            h = (x @ self.w) + torch.einsum("mk,kn->mn", x, self.w) + torch.tensordot(x, self.w, 1)
            return h + torch.mv(self.w.T, x[0]) + (x @ x.T).sum()  # the last one: two activations

    m = abfp.convert(Mixed(), CFG, include_matmul=False)
    with torch.no_grad():
        y = m(A)
    cov = abfp.coverage(m)
    assert cov.analog_macs == 3 * 5 * 20 * 7 + 7 * 20 and cov.digital_macs == 5 * 5 * 20
    assert list(cov.digital_ops) == ["Tensor.matmul (include_matmul=False)"]
    ref = oracle(A, B)
    close(y, 3 * ref + oracle(B.T.contiguous(), A[0].unsqueeze(1)).squeeze(1) + (A.double() @ A.double().T).sum())


def test_einsum_with_a_zero_dimensional_operand():
    """``einsum("ij,->ij", x, s)`` (torch takes it) raised TypeError inside a converted module;
    it is a product with ``K = 1`` per element, as ``outer`` is."""
    gz = torch.Generator().manual_seed(6)
    x, s0 = torch.randn(3, 4, generator=gz), torch.tensor(2.5)
    y, s = run(lambda p, q: torch.einsum("ij,->ij", p, q), x, s0)
    close(y, oracle(x.reshape(12, 1), s0.reshape(1, 1)).reshape(3, 4))
    assert s.analog_macs == 12


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*reduce_range.*:UserWarning")
def test_torch_ao_quantized_layers_are_named_and_counted_as_digital():
    """torch.ao's quantized layers call ``torch.ops.quantized.*`` kernels on packed weights: they
    ran in float32/int8 with no warning and no MACs counted (device MAC share 100 % of nothing)."""
    net = nn.Sequential(nn.Linear(20, 6), nn.ReLU(), nn.Linear(6, 2))
    qm = torch.ao.quantization.quantize_dynamic(net, {nn.Linear}, dtype=torch.qint8)
    m = abfp.convert(qm, CFG)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m(A)
    named = [str(x.message) for x in w if issubclass(x.category, DigitalProductWarning)]
    assert len(named) == 1 and "torch.ops.quantized.linear_dynamic" in named[0]
    cov = abfp.coverage(m)
    assert cov.analog_macs == 0 and cov.digital_macs == 5 * 20 * 6 + 5 * 6 * 2

    conv = nn.Sequential(torch.ao.quantization.QuantStub(), nn.Conv2d(2, 3, 3), torch.ao.quantization.DeQuantStub()).eval()
    conv.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    prepared = torch.ao.quantization.prepare(conv)
    prepared(torch.randn(1, 2, 6, 6))
    m = abfp.convert(torch.ao.quantization.convert(prepared), CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DigitalProductWarning)
        m(torch.randn(1, 2, 6, 6))
    assert abfp.coverage(m).digital_ops == {"torch.ops.quantized.conv2d (no analog model)": 3 * 4 * 4 * 2 * 3 * 3}
