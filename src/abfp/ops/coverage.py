"""Coverage: the share of a converted model's MACs that the device computed.

SPEC section 3.1: no product is digital without saying so. While a converted model runs,
every product is counted (:class:`Coverage`, kept on the model's
:class:`~abfp.nn.state.AnalogState`):

* ``analog_macs``: products answered by a product family (``abfp.ops``) on the device;
* ``digital_macs``: product-like calls that stayed float32, by name in ``digital_ops``: calls
  with no analog model (``torch.cdist``, direct ``torch.ops.aten`` products,
  ``torch._int_mm``, ...) and products inside modules the user excluded.

A product-like call with no analog model is named in a :class:`DigitalProductWarning` once per
converted model (not once per process: a second model, or the same model after
:func:`abfp.set_config`, warns again). ``share = analog / (analog + digital)``.
"""

from __future__ import annotations

import math
import operator
import secrets
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Coverage", "coverage", "coverage_for", "DigitalProductWarning", "digital_product_macs", "estimate_macs", "no_analog_model",
           "register_macs", "odd_layout", "tensordot_macs"]


class DigitalProductWarning(UserWarning):
    """A product inside a converted model has no analog model and ran in float32."""


# shown every time it is raised: abfp itself decides when to warn (once per model per op)
warnings.simplefilter("always", DigitalProductWarning)


@dataclass
class Coverage:
    """MACs computed on the device and in float32 while a converted model ran.

    ``token``: the number that names this counter inside a traced graph (``torch.compile``,
    ``torch.export``, ``torch.jit.trace``): the custom operator ``abfp::count`` of each traced
    product carries it and adds the product's MACs here when the graph runs (:func:`coverage_for`).
    Random (62 bits), so a program exported in one process and run in another (or after this
    counter is gone) names no counter and counts nothing; a copy (``copy``, ``deepcopy``, pickle)
    draws a token of its own."""

    analog_macs: int = 0
    digital_macs: int = 0
    digital_ops: dict[str, int] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    token: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._register()

    def _register(self) -> None:
        self.token = secrets.randbits(62) | 1  # never 0 (0: count nowhere)
        _COVERAGES[self.token] = self

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "token"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._register()

    @property
    def total_macs(self) -> int:
        return self.analog_macs + self.digital_macs

    @property
    def share(self) -> float:
        """Share of the counted MACs computed on the device (1.0 when nothing was counted)."""
        return self.analog_macs / self.total_macs if self.total_macs else 1.0

    def add_digital(self, name: str, macs: int) -> None:
        self.digital_macs += int(macs)
        self.digital_ops[name] = self.digital_ops.get(name, 0) + int(macs)

    def reset(self) -> None:
        self.analog_macs = 0
        self.digital_macs = 0
        self.digital_ops.clear()

    def as_dict(self) -> dict[str, Any]:
        return {"analog_macs": self.analog_macs, "digital_macs": self.digital_macs, "share": self.share,
                "digital_ops": dict(self.digital_ops)}

    def __str__(self) -> str:
        s = f"device MAC share {100 * self.share:.2f}% ({self.analog_macs:,} analog, {self.digital_macs:,} digital)"
        if self.digital_ops:
            s += "; digital: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.digital_ops.items()))
        return s


#: every live :class:`Coverage` by its token (weak: a model that is gone leaves no entry)
_COVERAGES: "weakref.WeakValueDictionary[int, Coverage]" = weakref.WeakValueDictionary()


def coverage_for(token: int) -> Coverage | None:
    """The live :class:`Coverage` whose :attr:`~Coverage.token` is ``token``, or None (0, a model
    that is gone, a token from another process)."""
    return _COVERAGES.get(token) if token else None


# ----------------------------------------------------------------------------- MAC estimates
def _t(x: Any) -> Tensor | None:
    return x if isinstance(x, Tensor) else None


def _matmul_macs(a: Any, b: Any, out: Any) -> int:
    a, o = _t(a), _t(out)
    if a is None or o is None or a.dim() == 0:
        return 0
    return o.numel() * a.shape[-1]


def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def _linear(args, kwargs, out):
    w = _t(_arg(args, kwargs, 1, "weight"))
    return out.numel() * w.shape[-1] if w is not None and isinstance(out, Tensor) else 0


def _conv(args, kwargs, out):
    w = _t(_arg(args, kwargs, 1, "weight"))
    return out.numel() * w[0].numel() if w is not None and isinstance(out, Tensor) and w.dim() else 0


def _conv_transpose(args, kwargs, out):
    x, w = _t(_arg(args, kwargs, 0, "input")), _t(_arg(args, kwargs, 1, "weight"))
    return x.numel() * math.prod(w.shape[1:]) if x is not None and w is not None else 0


def _convolution(args, kwargs, out):
    transposed = bool(_arg(args, kwargs, 6, "transposed"))
    return _conv_transpose(args, kwargs, out) if transposed else _conv(args, kwargs, out)


def _mm(args, kwargs, out):
    return _matmul_macs(_arg(args, kwargs, 0, "input"), None, out)


def _addmm(args, kwargs, out):
    return _matmul_macs(_arg(args, kwargs, 1, "mat1"), None, out)


def _addmv(args, kwargs, out):
    return _matmul_macs(_arg(args, kwargs, 1, "mat"), None, out)


def _baddbmm(args, kwargs, out):
    return _matmul_macs(_arg(args, kwargs, 1, "batch1"), None, out)


def _addbmm(args, kwargs, out):
    b1 = _t(_arg(args, kwargs, 1, "batch1"))
    b2 = _t(_arg(args, kwargs, 2, "batch2"))
    return b1.shape[0] * b1.shape[1] * b1.shape[2] * b2.shape[2] if b1 is not None and b2 is not None else 0


def _rmatmul(args, kwargs, out):
    """``b.__rmatmul__(a)`` is ``a @ b``: the reduction is ``a``'s last axis."""
    return _matmul_macs(_arg(args, kwargs, 1, "other"), None, out)


def _outer(args, kwargs, out):
    """``outer``/``ger``/``addr``: one product of two elements per output (K = 1, as the device counts it)."""
    return out.numel() if isinstance(out, Tensor) else 0


def _vecdot(args, kwargs, out):
    x, y = _t(_arg(args, kwargs, 0, "x")), _t(_arg(args, kwargs, 1, "y"))
    dim = kwargs.get("dim", -1)
    if x is None or y is None or not isinstance(out, Tensor) or x.dim() == 0:
        return 0
    return out.numel() * max(x.shape[dim], y.shape[dim] if y.dim() else 1)


def _cdist(args, kwargs, out):
    x1 = _t(_arg(args, kwargs, 0, "x1"))
    return out.numel() * x1.shape[-1] if x1 is not None and isinstance(out, Tensor) else 0


def _conv_tbc(args, kwargs, out):
    w = _t(_arg(args, kwargs, 1, "weight"))  # (k, C_in, C_out)
    return out.numel() * w.shape[0] * w.shape[1] if w is not None and isinstance(out, Tensor) else 0


def _sdpa(args, kwargs, out):
    q, k, v = (_t(_arg(args, kwargs, i, n)) for i, n in enumerate(("query", "key", "value")))
    if q is None or k is None or v is None:
        return 0
    lead = math.prod(q.shape[:-2])
    return lead * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _sampled_addmm(args, kwargs, out):
    """``torch.sparse.sampled_addmm(input, mat1, mat2)``: only the ``nnz`` outputs that ``input``
    keeps are computed, ``K`` MACs each."""
    inp, a = _t(_arg(args, kwargs, 0, "input")), _t(_arg(args, kwargs, 1, "mat1"))
    return inp._nnz() * a.shape[-1] if inp is not None and a is not None and inp.layout != torch.strided else 0


def _affine_grid(args, kwargs, out):
    """``F.affine_grid(theta, size)``: each output coordinate is one row of the base grid
    ``(x, y, 1)`` (3-D: ``(x, y, z, 1)``) times ``theta``, ``K = theta.shape[-1]`` MACs."""
    theta = _t(_arg(args, kwargs, 0, "theta"))
    return out.numel() * theta.shape[-1] if theta is not None and isinstance(out, Tensor) else 0


def _attention_block(batch: int, length: int, keys: int, e: int) -> int:
    """MACs of one multi-head attention block as the device counts ``nn.MultiheadAttention``:
    q, k, v and out projections (``E x E`` each) and ``QK^T``, ``AV`` over all heads (``E`` wide)."""
    return batch * (2 * length * e * e + 2 * keys * e * e + 2 * length * keys * e)


def _native_mha(args, kwargs, out):
    """``torch._native_multi_head_attention(q, k, v, E, H, ...)``: MHA's fast-path kernel, batch first."""
    q, k, e = _t(_arg(args, kwargs, 0, "query")), _t(_arg(args, kwargs, 1, "key")), _arg(args, kwargs, 3, "embed_dim")
    if q is None or k is None:
        return 0
    return _attention_block(q.shape[0] if q.dim() == 3 else 1, q.shape[-2], k.shape[-2], int(e))


def _encoder_layer_fwd(args, kwargs, out):
    """``torch._transformer_encoder_layer_fwd(src, E, H, ...)``: ``nn.TransformerEncoderLayer``'s
    fast-path kernel: self-attention, then the feed-forward ``E -> F -> E``."""
    src, e, w1 = _t(_arg(args, kwargs, 0, "src")), _arg(args, kwargs, 1, "embed_dim"), _t(_arg(args, kwargs, 14, "ffn_weight_1"))
    if src is None or w1 is None:
        return 0
    b, n = (src.shape[0], src.shape[1]) if src.dim() == 3 else (1, src.shape[0])
    return _attention_block(b, n, n, int(e)) + 2 * b * n * int(e) * w1.shape[0]


def _kron(args, kwargs, out):
    return out.numel() if isinstance(out, Tensor) else 0  # each output is one product of two elements


def _matrix_power(args, kwargs, out):
    """``A^n`` by repeated squaring (torch's way): ``floor(log2 |n|) + popcount(|n|) - 1`` matrix
    products of ``m x m`` matrices, ``m^3`` MACs each, per matrix of the batch; for ``n < 0`` the
    inverse first (``m^3``, as :data:`_LINALG` counts ``inv``)."""
    a, n = _t(_arg(args, kwargs, 0, "input")), int(_arg(args, kwargs, 1, "n"))
    if a is None:
        return 0
    inverse = a.numel() * a.shape[-1] if n < 0 else 0
    n = abs(n)
    return inverse + (0 if n < 2 else (n.bit_length() - 1 + bin(n).count("1") - 1) * a.numel() * a.shape[-1])


def _bilinear(args, kwargs, out):
    """``y[., o] = sum_j (sum_i x1[., i] A[o, i, j]) x2[., j]``: ``in1 * in2`` MACs, then ``in2``, per
    output (torch's ``_trilinear`` and the device's two products alike)."""
    w = _t(_arg(args, kwargs, 2, "weight"))
    return out.numel() * (w.shape[1] + 1) * w.shape[2] if w is not None and isinstance(out, Tensor) and w.dim() == 3 else 0


# ----------------------------------------------------------------------------- linear algebra (digital, estimated)
# torch.linalg's solvers, inverses, determinants and matrix exponential multiply inside LAPACK (or
# ATen's C++), where no Python mode sees a product; no analog model computes them (a factorisation
# pivots and divides between its products). Each is named and counted as digital, with the classic
# operation counts of dense linear algebra in MACs, per matrix of the (broadcast) batch, for an
# n x n system (a solver's matrix) with k right-hand sides (a vector: k = 1):
#   LU factorisation n^3/3; two triangular substitutions n^2 k; one (triangular_solve,
#   solve_triangular) n(n+1)/2 k
#   solve = LU + substitutions (n^3/3 + n^2 k); lu_solve, cholesky_solve: substitutions only (n^2 k)
#   inv = n^3 (LU, then the inverse from the factors); det, slogdet, logdet: the LU, n^3/3
#   cholesky_inverse: n^3/3 (the triangular inverse, n^3/6, and its Gram product, n^3/6)
#   lstsq (m x n, q = max, p = min): a QR, q p^2 - p^3/3, then Q^T B, m p k, and R's substitution p^2 k/2
#   pinv (m x n): a QR (q p^2 - p^3/3) and the SVD of its p x p factor (p^3), then V S^+ U^T (m n p)
#   matrix_exp: torch's degree-18 Taylor form (5 products) and s squarings, (5 + s) n^3 with
#     s = max(0, ceil(log2(|A|_1 / 3.01))) per matrix (an upper estimate: torch takes a lower degree,
#     fewer products, for a matrix of small norm)
#   householder_product(A: m x n, tau: k reflectors): 2 m n k - (m + n) k^2 + 2 k^3/3 (half LAPACK's orgqr flops)
# and the decompositions, by the reduction they start with (their iterations are not counted: a
# lower estimate): cholesky n^3/6; lu_factor, lu, ldl_factor n^3/3; qr, geqrf q p^2 - p^3/3; svd,
# svdvals the QR and p^3; eigh, eigvalsh the tridiagonal reduction 2 n^3/3; eig, eigvals the
# Hessenberg reduction 5 n^3/3
def _batch(*shapes: Any) -> int:
    return math.prod(torch.broadcast_shapes(*[tuple(s) for s in shapes])) if shapes else 1


def _rhs(a: Tensor, b: Tensor, left: bool = True) -> tuple[int, int]:
    """``(batch, k)`` of a solve of ``a`` (..., n, n) with ``b``: (..., n, k), (..., k, n) for
    ``left=False``, or a vector (..., n), k = 1."""
    if b.dim() == a.dim() - 1 or b.dim() == 1:
        return _batch(a.shape[:-2], b.shape[:-1]), 1
    return _batch(a.shape[:-2], b.shape[:-2]), b.shape[-1] if left else b.shape[-2]


def _lu_macs(n: int) -> int:
    return n**3 // 3


def _solve(args, kwargs, out):
    a, b = _t(_arg(args, kwargs, 0, "A")), _t(_arg(args, kwargs, 1, "B"))
    batch, k = _rhs(a, b, kwargs.get("left", True))
    n = a.shape[-1]
    return batch * (_lu_macs(n) + n * n * k)


def _lu_solve(args, kwargs, out):
    """``linalg.lu_solve(LU, pivots, B)``: the substitutions only."""
    lu, b = _t(_arg(args, kwargs, 0, "LU")), _t(_arg(args, kwargs, 2, "B"))
    batch, k = _rhs(lu, b, kwargs.get("left", True))
    return batch * lu.shape[-1] ** 2 * k


def _b_first_solve(args, kwargs, out, name: str, tri: bool):
    """``cholesky_solve(B, L)``, ``triangular_solve(b, A)``: the right-hand side first."""
    b, a = _t(_arg(args, kwargs, 0, "input")), _t(_arg(args, kwargs, 1, name))
    batch, k = _rhs(a, b)
    n = a.shape[-1]
    return batch * (n * (n + 1) // 2 if tri else n * n) * k


def _solve_triangular(args, kwargs, out):
    a, b = _t(_arg(args, kwargs, 0, "input")), _t(_arg(args, kwargs, 1, "B"))
    batch, k = _rhs(a, b, kwargs.get("left", True))
    n = a.shape[-1]
    return batch * n * (n + 1) // 2 * k


def _square(per: Callable[[int], int]) -> MacEstimator:
    def est(args, kwargs, out):
        a = _t(_arg(args, kwargs, 0, "A" if "A" in kwargs else "input"))
        return _batch(a.shape[:-2]) * per(a.shape[-1])
    return est


def _rect(per: Callable[[int, int], int]) -> MacEstimator:
    """MACs of a decomposition of the (..., m, n) input: ``per(m, n)`` per matrix of the batch."""
    def est(args, kwargs, out):
        a = _t(_arg(args, kwargs, 0, "A" if "A" in kwargs else "input"))
        return _batch(a.shape[:-2]) * per(*a.shape[-2:])
    return est


def _qr_macs(m: int, n: int) -> int:
    q, p = max(m, n), min(m, n)
    return q * p * p - p**3 // 3


def _lstsq(args, kwargs, out):
    a, b = _t(_arg(args, kwargs, 0, "A" if "A" in kwargs else "input")), _t(_arg(args, kwargs, 1, "B"))
    m, n = a.shape[-2:]
    p = min(m, n)
    vector = b.dim() == a.dim() - 1
    k = 1 if vector else b.shape[-1]
    return _batch(a.shape[:-2], b.shape[:-1] if vector else b.shape[:-2]) * (_qr_macs(m, n) + m * p * k + p * p * k // 2)


def _pinv(args, kwargs, out):
    a = _t(_arg(args, kwargs, 0, "A" if "A" in kwargs else "input"))
    m, n = a.shape[-2:]
    p = min(m, n)
    return _batch(a.shape[:-2]) * (_qr_macs(m, n) + p**3 + m * n * p)


def _matrix_exp(args, kwargs, out):
    a = _t(_arg(args, kwargs, 0, "A" if "A" in kwargs else "input"))
    n = a.shape[-1]
    if a.numel() == 0:
        return 0
    with torch.no_grad():
        norm = a.detach().abs().double().sum(-2).amax(-1).reshape(-1)
        s = torch.ceil(torch.log2(norm / 3.010066362817634)).clamp(min=0).nan_to_num(0.0)
    return int((5 + s).sum()) * n**3


def _householder(args, kwargs, out):
    a, tau = _t(_arg(args, kwargs, 0, "A" if "A" in kwargs else "input")), _t(_arg(args, kwargs, 1, "tau"))
    m, n = a.shape[-2:]
    k = tau.shape[-1]
    return _batch(a.shape[:-2]) * max(0, 2 * m * n * k - (m + n) * k * k + 2 * k**3 // 3)


def _weight_gemm(args, kwargs, out):
    """A GEMM of an activation ``x`` (..., K) by a packed low-precision weight (torch's int8/int4 and
    fbgemm kernels): ``K`` MACs per output."""
    x = _t(_arg(args, kwargs, 0, "input" if "input" in kwargs else "self"))
    return out.numel() * x.shape[-1] if x is not None and isinstance(out, Tensor) else 0


def _trilinear(args, kwargs, out):
    """``torch._trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim)`` (what ``F.bilinear``
    calls): one MAC per point of the operands' broadcast index space."""
    ts = [_t(_arg(args, kwargs, i, n)) for i, n in enumerate(("i1", "i2", "i3"))]
    exp = [_arg(args, kwargs, 3 + i, f"expand{i + 1}") for i in range(3)]
    shapes = []
    for t, e in zip(ts, exp):
        shape = list(t.shape)
        for d in sorted(e):
            shape.insert(d, 1)
        shapes.append(shape)
    return math.prod(torch.broadcast_shapes(*shapes))


def _cosine_embedding_loss(args, kwargs, out):
    """``cosine_embedding_loss(x1, x2, y)``: one dot product ``x1 . x2`` per pair, ``D`` MACs (the
    norms beside it are no products, as everywhere)."""
    x1, x2 = _t(_arg(args, kwargs, 0, "input1")), _t(_arg(args, kwargs, 1, "input2"))
    return math.prod(torch.broadcast_shapes(x1.shape, x2.shape)) if x1 is not None and x2 is not None else 0


#: low-precision weight GEMMs (weight-only quantised LLM layers) and other product kernels torch
#: exposes as functions: no analog model (their weights are packed integer or float16 codes)
_WEIGHT_GEMMS = [f for f in (getattr(torch, n, None) for n in (
    "_weight_int8pack_mm", "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu", "_weight_int4pack_mm_with_scales_and_zeros",
    "_dyn_quant_matmul_4bit", "fbgemm_linear_fp16_weight", "fbgemm_linear_fp16_weight_fp32_activation",
    "fbgemm_linear_int8_weight", "fbgemm_linear_int8_weight_fp32_activation")) if f is not None]


_LINALG: dict[Any, MacEstimator] = {
    torch.linalg.solve: _solve, torch.linalg.solve_ex: _solve,
    torch.linalg.lu_solve: _lu_solve,
    torch.lu_solve: lambda a, k, o: _b_first_solve(a, k, o, "LU_data", False),  # (b, LU_data, LU_pivots)
    torch.Tensor.lu_solve: lambda a, k, o: _b_first_solve(a, k, o, "LU_data", False),
    torch.cholesky_solve: lambda a, k, o: _b_first_solve(a, k, o, "input2", False),
    torch.Tensor.cholesky_solve: lambda a, k, o: _b_first_solve(a, k, o, "input2", False),
    torch.triangular_solve: lambda a, k, o: _b_first_solve(a, k, o, "A", True),
    torch.Tensor.triangular_solve: lambda a, k, o: _b_first_solve(a, k, o, "A", True),
    torch.linalg.solve_triangular: _solve_triangular,
    torch.linalg.inv: _square(lambda n: n**3), torch.linalg.inv_ex: _square(lambda n: n**3),
    torch.inverse: _square(lambda n: n**3), torch.Tensor.inverse: _square(lambda n: n**3),
    torch.cholesky_inverse: _square(lambda n: n**3 // 3), torch.Tensor.cholesky_inverse: _square(lambda n: n**3 // 3),
    **{f: _square(_lu_macs) for f in (torch.linalg.det, torch.det, torch.Tensor.det, torch.logdet, torch.Tensor.logdet,
                                      torch.slogdet, torch.Tensor.slogdet, torch.linalg.slogdet)},
    torch.linalg.lstsq: _lstsq,
    torch.linalg.pinv: _pinv, torch.pinverse: _pinv, torch.Tensor.pinverse: _pinv,
    torch.linalg.matrix_exp: _matrix_exp, torch.matrix_exp: _matrix_exp, torch.Tensor.matrix_exp: _matrix_exp,
    torch.linalg.householder_product: _householder, torch.orgqr: _householder, torch.Tensor.orgqr: _householder,
    **{f: _square(lambda n: n**3 // 6) for f in (torch.linalg.cholesky, torch.linalg.cholesky_ex, torch.cholesky,
                                                  torch.Tensor.cholesky)},
    **{f: _square(_lu_macs) for f in (torch.linalg.lu_factor, torch.linalg.lu_factor_ex, torch.linalg.lu,
                                      torch.linalg.ldl_factor, torch.linalg.ldl_factor_ex)},
    **{f: _rect(_qr_macs) for f in (torch.linalg.qr, torch.qr, torch.Tensor.qr, torch.geqrf, torch.Tensor.geqrf)},
    **{f: _rect(lambda m, n: _qr_macs(m, n) + min(m, n) ** 3) for f in (torch.linalg.svd, torch.svd, torch.Tensor.svd,
                                                                         torch.linalg.svdvals)},
    **{f: _square(lambda n: 2 * n**3 // 3) for f in (torch.linalg.eigh, torch.linalg.eigvalsh)},
    **{f: _square(lambda n: 5 * n**3 // 3) for f in (torch.linalg.eig, torch.linalg.eigvals)},
}


MacEstimator = Callable[[tuple, dict, Any], int]

#: MACs of a product computed in float32, from its arguments and output.
_ESTIMATORS: dict[Any, MacEstimator] = {
    F.linear: _linear,
    torch.conv1d: _conv, torch.conv2d: _conv, torch.conv3d: _conv,
    torch.conv_transpose1d: _conv_transpose, torch.conv_transpose2d: _conv_transpose,
    torch.conv_transpose3d: _conv_transpose,
    torch.convolution: _convolution, torch._convolution: _convolution,
    torch.matmul: _mm, torch.Tensor.matmul: _mm, torch.Tensor.__matmul__: _mm, torch.mm: _mm, torch.Tensor.mm: _mm,
    torch.bmm: _mm, torch.Tensor.bmm: _mm, torch.mv: _mm, torch.Tensor.mv: _mm, torch.linalg.matmul: _mm,
    torch.dot: _mm, torch.Tensor.dot: _mm, torch.inner: _mm, torch._int_mm: _mm,
    torch.addmm: _addmm, torch.Tensor.addmm: _addmm, torch.baddbmm: _baddbmm, torch.Tensor.baddbmm: _baddbmm,
    torch.addmv: _addmv, torch.Tensor.addmv: _addmv,
    torch.addbmm: _addbmm, torch.Tensor.addbmm: _addbmm,
    operator.matmul: _mm, torch.Tensor.__rmatmul__: _rmatmul, torch.vdot: _mm, torch.Tensor.vdot: _mm,
    torch.Tensor.inner: _mm, torch.linalg.vecdot: _vecdot,
    torch.outer: _outer, torch.Tensor.outer: _outer, torch.ger: _outer, torch.Tensor.ger: _outer,
    torch.addr: _outer, torch.Tensor.addr: _outer, torch.Tensor.addr_: _outer,
    torch.Tensor.addmm_: _addmm, torch.Tensor.addmv_: _addmv, torch.addmv_: _addmv, torch.Tensor.baddbmm_: _baddbmm,
    torch.Tensor.addbmm_: _addbmm,
    torch.cdist: _cdist,
    torch.conv_tbc: _conv_tbc,
    F.scaled_dot_product_attention: _sdpa,
    F.bilinear: _bilinear,
    torch.kron: _kron, torch.Tensor.kron: _kron, torch._addmm_activation: _addmm,
    torch.linalg.matrix_power: _matrix_power, torch.matrix_power: _matrix_power, torch.Tensor.matrix_power: _matrix_power,
    F.affine_grid: _affine_grid, torch.affine_grid_generator: _affine_grid,
    torch._native_multi_head_attention: _native_mha, torch._transformer_encoder_layer_fwd: _encoder_layer_fwd,
    # sparse products: the dense count (rows x columns x K), what the device would compute
    torch.sparse.mm: _mm, torch.smm: _mm, torch.hspmm: _mm, torch.sparse.addmm: _addmm, torch.sspaddmm: _addmm,
    torch.sparse.sampled_addmm: _sampled_addmm,
    **_LINALG, **{f: _weight_gemm for f in _WEIGHT_GEMMS}, torch._trilinear: _trilinear,
    F.cosine_embedding_loss: _cosine_embedding_loss, torch.cosine_embedding_loss: _cosine_embedding_loss,
}


def register_macs(*funcs: Any) -> Callable[[MacEstimator], MacEstimator]:
    """Decorator: ``est(args, kwargs, out)`` gives the MACs of ``funcs`` computed in float32.

    A product family registers one for every function it answers with several products (a
    recurrent layer, attention, an einsum chain), counted as the family would count them on the
    device: that call inside an excluded module (or under ``include_matmul=False``) runs whole
    in float32, and without it its MACs counted as 0 (a device share of 100 % with an LSTM off
    the device)."""

    def deco(est: MacEstimator) -> MacEstimator:
        for f in funcs:
            _ESTIMATORS[f] = est
        return est

    return deco


#: Product-like functions that have no analog model: they run in float32 with a warning.
_NO_ANALOG_MODEL: set[Any] = {torch.cdist, torch._int_mm, torch.convolution, torch._convolution,
                              torch.kron,
                              torch.Tensor.kron, torch._addmm_activation,
                              # a spatial transformer's sampling grid: coordinates times theta (K = 3 or 4)
                              F.affine_grid, torch.affine_grid_generator,
                              # the fused fast-path kernels of nn.MultiheadAttention and nn.TransformerEncoderLayer,
                              # which those modules do not take inside a converted model, called directly
                              torch._native_multi_head_attention, torch._transformer_encoder_layer_fwd,
                              # solvers, inverses, determinants, matrix exponentials: products inside LAPACK
                              *_LINALG, *_WEIGHT_GEMMS, torch._trilinear,
                              # a loss of dot products computed inside ATen (a mul and a sum)
                              F.cosine_embedding_loss, torch.cosine_embedding_loss}
for _name in ("_scaled_mm", "cudnn_convolution", "mkldnn_convolution", "cudnn_convolution_transpose",
              "miopen_convolution", "sparse_coo_tensor_mm", "smm", "hspmm", "sspaddmm"):
    _f = getattr(torch, _name, None)
    if _f is not None:
        _NO_ANALOG_MODEL.add(_f)
for _f in (getattr(torch.sparse, "mm", None), getattr(torch.sparse, "addmm", None),
           getattr(torch.sparse, "sampled_addmm", None)):
    if _f is not None:
        _NO_ANALOG_MODEL.add(_f)

#: aten operators that are products: reached directly (``torch.ops.aten.mm(...)``) they bypass
#: the functional API that the product families answer.
_ATEN_PRODUCTS = {"mm", "bmm", "addmm", "addmv", "addbmm", "baddbmm", "mv", "dot", "matmul", "linear",
                  "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                  "conv_transpose2d", "conv_transpose3d", "einsum", "tensordot", "_int_mm", "lstm", "gru",
                  "rnn_tanh", "rnn_relu", "bilinear", "cdist", "scaled_dot_product_attention",
                  "_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_native_multi_head_attention", "_transformer_encoder_layer_fwd"}


def tensordot_macs(a: Tensor, b: Tensor, dims_b: Any) -> int:
    """A tensordot of ``a`` with ``b`` contracting ``b``'s axes ``dims_b``: ``M K N`` (every element
    of ``a`` meets every kept element of ``b``)."""
    keep = [j for j in range(b.dim()) if j not in {d % b.dim() for d in dims_b}]
    return a.numel() * math.prod(b.shape[j] for j in keep)


def _aten_tensordot(args, kwargs, out):
    """``aten.tensordot(a, b, dims_a, dims_b)``."""
    b, dims_b = _t(_arg(args, kwargs, 1, "other")), _arg(args, kwargs, 3, "dims_other")
    a = _t(_arg(args, kwargs, 0, "self"))
    return 0 if a is None or b is None or dims_b is None else tensordot_macs(a, b, dims_b)


#: aten products whose arguments are not those of the torch function of the same name
_ATEN_ESTIMATORS: dict[str, MacEstimator] = {"tensordot": _aten_tensordot, "linear": _linear,
                                             **{op: _sdpa for op in _ATEN_PRODUCTS if "scaled_dot_product" in op}}


#: torch.ao's quantized kernels (``nn.quantized.dynamic.Linear`` calls ``torch.ops.quantized.linear_dynamic``):
#: products on integer codes of torch's own quantisation, no analog model
_QUANTIZED_PRODUCTS = {"linear", "linear_dynamic", "linear_dynamic_fp16", "linear_dynamic_fp16_unpacked_weight",
                       "linear_leaky_relu", "linear_relu", "linear_relu_dynamic", "linear_relu_dynamic_fp16",
                       "linear_tanh", "linear_with_input_q_dq_qweight_dq_output_fp32",
                       "linear_with_input_q_dq_qweight_dq_relu_output_fp32", "conv1d", "conv1d_relu", "conv1d_dynamic",
                       "conv2d", "conv2d_relu", "conv2d_add", "conv2d_add_relu", "conv2d_dynamic", "conv3d",
                       "conv3d_relu", "conv3d_dynamic", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                       "conv_transpose1d_dynamic", "conv_transpose2d_dynamic", "conv_transpose3d_dynamic", "matmul",
                       "int4mm_packed_weight_cpu"}


def _op_name(func: Any) -> tuple[str, str] | None:
    """``(namespace, operator)`` of a ``torch.ops`` operator, else None."""
    ops = getattr(torch, "_ops", None)
    if ops is None or not isinstance(func, (ops.OpOverload, ops.OpOverloadPacket)):
        return None
    name = str(func.name() if isinstance(func, ops.OpOverload) else func._qualified_op_name)
    ns, _, op = name.partition("::")
    return ns, op.split(".")[0]


def _aten_name(func: Any) -> str | None:
    """``torch.ops.<ns>.<op>`` of a product operator reached directly (aten) or through torch.ao's
    quantized modules, else None."""
    name = _op_name(func)
    if name is None:
        return None
    ns, op = name
    if (ns == "aten" and op in _ATEN_PRODUCTS) or (ns == "quantized" and op in _QUANTIZED_PRODUCTS):
        return f"torch.ops.{ns}.{op}"
    return None


def _quantized(op: str) -> MacEstimator:
    """MACs of a torch.ao quantized kernel: its weight is packed (``weight()``/``unpack()``)."""
    def est(args, kwargs, out):
        x, packed = args[0], args[1]
        if op.startswith("linear") or op == "matmul":
            return _matmul_macs(x, None, out)
        w = packed.weight() if hasattr(packed, "weight") else packed.unpack()[0]
        return x.numel() * math.prod(w.shape[1:]) if op.startswith("conv_transpose") else out.numel() * w[0].numel()
    return est


def func_name(func: Any) -> str:
    """A readable name of a torch function: ``torch.cdist``, ``Tensor.addmm``, ``torch.kron``,
    ``torch.linalg.matrix_power``, ``torch.ops.aten.mm`` (the name users call it by, whatever
    class or extension module torch's build defines it in)."""
    aten = _aten_name(func)
    if aten is not None:
        return aten
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)
    mod = getattr(func, "__module__", None)
    if qual.startswith("_VariableFunctionsClass."):  # torch.kron, torch._int_mm, ... on recent torch
        return "torch." + qual.split(".", 1)[1]
    if mod == "torch._C._linalg" and qual.startswith("linalg_"):
        return "torch.linalg." + qual[len("linalg_"):]
    if mod == "torch._C._sparse":  # torch.sparse.mm is _sparse_mm, sampled_addmm sparse_sampled_addmm
        return "torch.sparse." + qual.removeprefix("_sparse_").removeprefix("sparse_")
    if mod in (None, "torch._C._VariableFunctions", "torch._C.TensorBase", "torch._C._nn", "torch._C._linalg",
               "torch.functional"):
        if qual.startswith("TensorBase.") or qual.startswith("Tensor."):
            return "Tensor." + qual.split(".", 1)[1]
        return f"torch.{qual}"
    return f"{mod}.{qual}"


def odd_layout(args: tuple, kwargs: dict) -> str | None:
    """The layout of the first operand of a call that is not a dense (strided) tensor, looking
    into lists of operands (``einsum``, ``multi_dot``): ``sparse_coo``, ``sparse_csr``, ...,
    ``jagged`` (a nested tensor of ``torch.jagged`` layout), ``nested`` (one of strided layout);
    None when every operand is dense. The device's products take dense operands."""
    for a in (*args, *kwargs.values()) if kwargs else args:  # runs at every product: the least Python (1 us)
        if isinstance(a, Tensor):
            if a.layout is not _STRIDED or a.is_nested:
                return _layout_name(a)
        elif isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, Tensor) and (t.layout is not _STRIDED or t.is_nested):
                    return _layout_name(t)
    return None


_STRIDED = torch.strided


def _layout_name(t: Tensor) -> str:
    return "nested" if t.layout is _STRIDED else str(t.layout).removeprefix("torch.")


def no_analog_model(func: Any) -> str | None:
    """The name of ``func`` when it is a product-like call with no analog model, else None."""
    if func in _NO_ANALOG_MODEL:
        return func_name(func)
    return _aten_name(func)


def estimate_macs(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """MACs of a product computed in float32 (0 when unknown); a ``torch.SymInt`` as it is (a
    traced graph with dynamic shapes: ``int()`` of it would pin the shape to the traced one)."""
    est = _ESTIMATORS.get(func)
    if est is None:
        name = _aten_name(func)
        if name is not None and name.startswith("torch.ops.quantized."):
            est = _quantized(name.rsplit(".", 1)[-1])
        elif name is not None:  # an aten product: as the torch function of its name counts it
            op = name.rsplit(".", 1)[-1]
            est = _ATEN_ESTIMATORS.get(op) or _ESTIMATORS.get(getattr(torch, op, None)) or _mm
    if est is None:
        return 0
    try:
        n = est(args, kwargs or {}, out)
        return n if isinstance(n, torch.SymInt) else int(n)
    except Exception:  # an estimate must never break the model
        return 0


def digital_product_macs(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """MACs of a call that stayed digital (see :func:`estimate_macs`)."""
    return estimate_macs(func, args, kwargs, out)


def coverage(model: torch.nn.Module) -> Coverage:
    """The :class:`Coverage` of a converted model: MACs on the device and in float32 since it was
    converted (or since ``coverage(model).reset()``)."""
    from ..nn.convert import analog_state

    return analog_state(model).coverage
