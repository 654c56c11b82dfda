"""Every other matrix-product function torch offers, on the device.

Each is rewritten as the products :func:`abfp.functional.matmul` / :func:`abfp.functional.linear`
compute (SPEC section 1: per-block scales along the reduction axis of both operands), with the
additions, scalings and sums around them digital (float32):

=====================================  =========================================================
``addmm(C, A, B, beta, alpha)``        ``beta * C + alpha * (A @ B)``; one product. When ``B`` is
                                       a parameter (Hugging Face GPT-2's ``Conv1D``) the site is
                                       a ``linear`` one: B is a static weight (rows ``B^T``).
``mv(A, v)``, ``addmv``                ``A @ v``: one product, ``K`` = columns of ``A``.
``addbmm(C, A, B)``                    ``beta * C + alpha * sum_b A[b] @ B[b]``; the sum over ``b``
                                       is digital (one product per ``b``, tiles summed in float32).
``baddbmm(C, A, B)``                   ``beta * C + alpha * A @ B`` (batched).
``dot``, ``inner``, ``vdot`` (real)    dot products: one product each, ``K`` = the shared length.
``outer``, ``ger``, ``addr``           ``a b^T``: a product with ``K = 1``.
``tensordot(a, b, dims)``              contracted axes flattened into one reduction axis (in the
                                       order ``dims`` pairs them), free axes into rows/columns.
``linalg.matmul``                      ``matmul``.
``linalg.vecdot(x, y, dim)``           one dot product of length ``x.shape[dim]`` per output.
``cosine_similarity(x1, x2, dim)``     one dot product per output of the operands each divided
                                       (digitally) by its norm along ``dim``, torch's formula.
``linalg.multi_dot``, ``chain_matmul`` left to right, each pairwise product on the device.
``einsum`` (any number of operands)    contracted pairwise, left to right; each pairwise
                                       contraction is one device product; indices private to one
                                       operand are summed digitally first; one-operand einsums
                                       (traces, transposes, sums) are not products and stay digital.
``F.bilinear(x1, x2, A, b)``           two products: ``u[., o, j] = sum_i x1[., i] A[o, i, j]``
                                       (a linear product with static weight rows ``A[o, :, j]``,
                                       ``K = in1``), then ``y[., o] = sum_j u[., o, j] x2[., j]`` (an
                                       activation-by-activation product, ``K = in2``); plus bias.
``linalg.matrix_power(A, n)``           torch's binary exponentiation, each product on the device.
``t.addmm_``, ``addmv_``, ``baddbmm_``, the out-of-place form's products, the result written into
``addbmm_``, ``addr_`` (in place)      ``t``.
=====================================  =========================================================

MACs recorded for ``summary`` and energy are those of the products as computed here
(``rows * columns * K`` each).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import linear as linear_family  # linear(), matmul()
from .coverage import register_macs, tensordot_macs
from .linear import einsum_pair, einsum_subscripts, is_weight as _is_weight
from .site import Frame, digital_call, digital_dtype, run_product, warn_digital
from .registry import register


# ----------------------------------------------------------------------------- primitives
def device_matmul(frame: Frame, a: Tensor, b: Tensor) -> Tensor:
    """``torch.matmul(a, b)`` as one device product through :func:`run_product` (batched and
    broadcast like torch.matmul; 1-D operands as in torch). With ``convert(...,
    include_matmul=False)`` a product of two activations stays float32, counted as digital."""
    if not frame.state.include_matmul and not (_is_weight(a) or _is_weight(b)):
        return digital_call(frame, torch.matmul, (a, b), {}, "include_matmul=False")
    k = a.shape[-1]
    return run_product(
        frame, "matmul", torch.matmul, (a, b), {},
        lambda c, s, stats, g: linear_family.matmul(a, b, config=c, generator=g, stats=stats, a_scale=s[0], b_scale=s[1]),
        (a, b), k, lambda y: max(1, y.numel()) * k if y.numel() else 0,
    )


def device_weight_product(frame: Frame, x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` with ``w`` (N, K) a static weight, as a ``linear`` site (weight scales and codes
    cached per weight value)."""
    k = w.shape[1]
    m = x.numel() // max(1, x.shape[-1])
    return run_product(
        frame, "linear", F.linear, (x, w), {},
        lambda c, s, stats, g: linear_family.linear(x, w, None, config=c, input_scale=s[0], generator=g, stats=stats, cache=False),
        (x, w), k, lambda y: m * w.shape[0] * k,
    )


def _scaled_add(inp: Tensor, prod: Tensor, beta: Any, alpha: Any) -> Tensor:
    """``beta * inp + alpha * prod`` (digital); ``beta = 0`` ignores ``inp`` (NaN included), as torch."""
    out = prod if alpha == 1 else prod * alpha
    if beta == 0:
        return out.expand(torch.broadcast_shapes(inp.shape, out.shape)).clone() if inp.shape != out.shape else out
    return out + (inp if beta == 1 else inp * beta)


def _finish(result: Tensor, out: Tensor | None) -> Tensor:
    if out is None:
        return result
    out.resize_(result.shape)
    out.copy_(result)
    return out


# ----------------------------------------------------------------------------- addmm family
def _addmm_args(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    return input, mat1, mat2, beta, alpha, out


@register(torch.addmm, torch.Tensor.addmm)
def answer_addmm(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    inp, a, b, beta, alpha, out = _addmm_args(*args, **kwargs)
    if _is_weight(b) and not _is_weight(a):
        prod = device_weight_product(frame, a, b.t())
    else:
        prod = device_matmul(frame, a, b)
    return _finish(_scaled_add(inp, prod, beta, alpha), out)


def _addmv_args(input, mat, vec, *, beta=1, alpha=1, out=None):
    return input, mat, vec, beta, alpha, out


@register(torch.addmv, torch.Tensor.addmv)
def answer_addmv(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    inp, mat, vec, beta, alpha, out = _addmv_args(*args, **kwargs)
    return _finish(_scaled_add(inp, device_matmul(frame, mat, vec), beta, alpha), out)


def _mv_args(input, vec, *, out=None):
    return input, vec, out


@register(torch.mv, torch.Tensor.mv)
def answer_mv(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    mat, vec, out = _mv_args(*args, **kwargs)
    if mat.dim() != 2 or vec.dim() != 1:
        return func(*args, **kwargs)  # torch raises its own error
    return _finish(device_matmul(frame, mat, vec), out)


def _baddbmm_args(input, batch1, batch2, *, beta=1, alpha=1, out=None):
    return input, batch1, batch2, beta, alpha, out


@register(torch.baddbmm, torch.Tensor.baddbmm)
def answer_baddbmm(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    inp, b1, b2, beta, alpha, out = _baddbmm_args(*args, **kwargs)
    return _finish(_scaled_add(inp, device_matmul(frame, b1, b2), beta, alpha), out)


@register(torch.addbmm, torch.Tensor.addbmm)
def answer_addbmm(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    inp, b1, b2, beta, alpha, out = _baddbmm_args(*args, **kwargs)
    prod = device_matmul(frame, b1, b2).sum(0)
    return _finish(_scaled_add(inp, prod, beta, alpha), out)


# ----------------------------------------------------------------------------- vector products
def _two(input, other, *, out=None):
    return input, other, out


@register(torch.dot, torch.Tensor.dot, torch.vdot, torch.Tensor.vdot)
def answer_dot(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    a, b, out = _two(*args, **kwargs)
    if a.dim() != 1 or b.dim() != 1:
        return func(*args, **kwargs)  # torch raises its own error
    if a.is_complex() or b.is_complex():  # no DAC encodes a complex number: named, counted digital
        return digital_dtype(frame, func, args, kwargs, a.dtype if a.is_complex() else b.dtype)
    return _finish(device_matmul(frame, a, b), out)


@register(torch.inner, torch.Tensor.inner)
def answer_inner(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    a, b, out = _two(*args, **kwargs)
    if a.dim() == 0 or b.dim() == 0:
        return func(*args, **kwargs)  # a scalar times a tensor: not a product
    return _finish(_tensordot(frame, a, b, [a.dim() - 1], [b.dim() - 1]), out)


@register(torch.outer, torch.Tensor.outer, torch.ger, torch.Tensor.ger)
def answer_outer(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    a, b, out = _two(*args, **kwargs)
    if a.dim() != 1 or b.dim() != 1:
        return func(*args, **kwargs)
    return _finish(device_matmul(frame, a.unsqueeze(1), b.unsqueeze(0)), out)


def _addr_args(input, vec1, vec2, *, beta=1, alpha=1, out=None):
    return input, vec1, vec2, beta, alpha, out


@register(torch.addr, torch.Tensor.addr)
def answer_addr(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    inp, a, b, beta, alpha, out = _addr_args(*args, **kwargs)
    if a.dim() != 1 or b.dim() != 1:
        return func(*args, **kwargs)
    return _finish(_scaled_add(inp, device_matmul(frame, a.unsqueeze(1), b.unsqueeze(0)), beta, alpha), out)


def _vecdot_args(x, y, *, dim=-1, out=None):
    return x, y, dim, out


def _device_vecdot(frame: Frame, x: Tensor, y: Tensor, dim: int) -> Tensor:
    """``sum_k x[..., k, ...] y[..., k, ...]`` over axis ``dim``: one device dot product per output
    (batch axes broadcast), as one batched ``(1, K) @ (K, 1)`` product."""
    xm, ym = x.movedim(dim, -1), y.movedim(dim, -1)
    batch = torch.broadcast_shapes(xm.shape[:-1], ym.shape[:-1])
    xm = xm.expand(*batch, xm.shape[-1]).unsqueeze(-2)
    ym = ym.expand(*batch, ym.shape[-1]).unsqueeze(-1)
    return device_matmul(frame, xm, ym).reshape(batch)


@register(torch.linalg.vecdot)
def answer_vecdot(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    x, y, dim, out = _vecdot_args(*args, **kwargs)
    if x.is_complex() or y.is_complex():
        return digital_dtype(frame, func, args, kwargs, x.dtype if x.is_complex() else y.dtype)
    return _finish(_device_vecdot(frame, x, y, dim), out)


def _cosine_args(x1, x2, dim=1, eps=1e-8):
    return x1, x2, dim, eps


@register(torch.cosine_similarity)  # also F.cosine_similarity and nn.CosineSimilarity: the same function
def answer_cosine_similarity(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    """``cos = sum_k (x1_k / n1) (x2_k / n2)``, ``n = max(||x||_2, eps)`` along ``dim`` of the
    broadcast operands (torch's formula: each operand normalised first): the norms and divisions
    digital, the dot product one device product per output, ``K`` = the size of ``dim``."""
    x1, x2, dim, eps = _cosine_args(*args, **kwargs)
    if not (x1.is_floating_point() and x2.is_floating_point()) or x1.dim() == 0:
        return func(*args, **kwargs)  # torch computes (or refuses) it as it does
    shape = torch.broadcast_shapes(x1.shape, x2.shape)
    x1, x2 = x1.expand(shape), x2.expand(shape)
    n1 = torch.linalg.vector_norm(x1, dim=dim, keepdim=True).clamp_min(eps)
    n2 = torch.linalg.vector_norm(x2, dim=dim, keepdim=True).clamp_min(eps)
    return _device_vecdot(frame, x1 / n1, x2 / n2, dim)


@register_macs(torch.cosine_similarity)
def _cosine_macs(args: tuple, kwargs: dict, out: Any) -> int:
    x1, x2, dim, _ = _cosine_args(*args, **kwargs)
    return out.numel() * torch.broadcast_shapes(x1.shape, x2.shape)[dim] if isinstance(out, Tensor) and x1.dim() else 0


# ----------------------------------------------------------------------------- tensordot
def _dims(dims: Any, da: int, db: int) -> tuple[list[int], list[int]]:
    if isinstance(dims, int):
        if dims < 0:
            raise RuntimeError(f"tensordot expects dims >= 0, but got dims={dims}")
        return list(range(da - dims, da)), list(range(dims))
    if isinstance(dims, Tensor):
        dims = dims.tolist()
        if isinstance(dims, int):
            return _dims(dims, da, db)
    a_d, b_d = dims
    a_d = [a_d] if isinstance(a_d, int) else list(a_d)
    b_d = [b_d] if isinstance(b_d, int) else list(b_d)
    return [d % da for d in a_d], [d % db for d in b_d]


def _tensordot(frame: Frame, a: Tensor, b: Tensor, da: list[int], db: list[int]) -> Tensor:
    """``a`` and ``b`` contracted over the paired axes ``da``/``db`` as one ``(M, K) @ (K, N)``
    device product; ``K`` the contracted axes flattened in the order the pairs are given."""
    if len(da) != len(db):
        raise RuntimeError("both dimension lists should have same length")
    fa = [i for i in range(a.dim()) if i not in da]
    fb = [i for i in range(b.dim()) if i not in db]
    for i, j in zip(da, db):
        if a.shape[i] != b.shape[j]:
            raise RuntimeError(f"contracted dimensions need to match, but first has size {a.shape[i]} in dim {i} "
                               f"and second has size {b.shape[j]} in dim {j}")
    k = math.prod(a.shape[i] for i in da)
    m = math.prod(a.shape[i] for i in fa)
    n = math.prod(b.shape[j] for j in fb)
    a2 = a.permute(fa + da).reshape(m, k)
    b2 = b.permute(db + fb).reshape(k, n)
    y = device_matmul(frame, a2, b2)
    return y.reshape([a.shape[i] for i in fa] + [b.shape[j] for j in fb])


def _tensordot_args(a, b, dims=2, out=None):
    return a, b, dims, out


@register(torch.tensordot)
def answer_tensordot(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    a, b, dims, out = _tensordot_args(*args, **kwargs)
    da, db = _dims(dims, a.dim(), b.dim())
    return _finish(_tensordot(frame, a, b, da, db), out)


@register_macs(torch.tensordot)
def _tensordot_macs(args: tuple, kwargs: dict, out: Any) -> int:
    a, b, dims, _ = _tensordot_args(*args, **kwargs)
    _, db = _dims(dims, a.dim(), b.dim())
    return tensordot_macs(a, b, db)


# ----------------------------------------------------------------------------- chains


def chain_order(mats: Sequence[Tensor]) -> tuple[Any, int]:
    """The order ``torch.linalg.multi_dot`` multiplies ``mats`` in (the fewest MACs; a 1-D first
    operand a row, a 1-D last one a column) and its MACs: ``(plan, macs)`` with ``plan`` an index
    or a pair of plans. Three matrices: torch's closed form, ``(AB)C`` on a tie; more: the
    matrix-chain dynamic programme, the first cheapest split on a tie (torch's)."""
    n = len(mats)
    p = [1 if i == 0 and m.dim() == 1 else m.shape[0] for i, m in enumerate(mats)]
    p.append(1 if mats[-1].dim() == 1 else mats[-1].shape[-1])
    if n == 1:
        return 0, 0
    if n == 2:
        return (0, 1), p[0] * p[1] * p[2]
    if n == 3:
        a, b, c, d = p
        cost1, cost2 = a * c * (b + d), b * d * (a + c)  # (AB)C, A(BC)
        return ((0, (1, 2)), cost2) if cost1 > cost2 else (((0, 1), 2), cost1)
    cost = [[0] * n for _ in range(n)]
    split = [[0] * n for _ in range(n)]
    for span in range(1, n):
        for i in range(n - span):
            j = i + span
            cost[i][j] = -1
            for k in range(i, j):
                q = cost[i][k] + cost[k + 1][j] + p[i] * p[k + 1] * p[j + 1]
                if cost[i][j] < 0 or q < cost[i][j]:
                    cost[i][j], split[i][j] = q, k

    def plan(i: int, j: int) -> Any:
        return i if i == j else (plan(i, split[i][j]), plan(split[i][j] + 1, j))

    return plan(0, n - 1), cost[0][n - 1]


def _chain(frame: Frame, mats: Sequence[Tensor]) -> Tensor:
    """The chain's products on the device, in torch's order (:func:`chain_order`)."""
    if len(mats) == 0:
        raise RuntimeError("multi_dot(): expected at least 2 tensors but got 0")

    def run(plan: Any) -> Tensor:
        return mats[plan] if isinstance(plan, int) else device_matmul(frame, run(plan[0]), run(plan[1]))

    return run(chain_order(mats)[0])


def _chain_mats(args: tuple, kwargs: dict) -> list[Tensor]:
    if "tensors" in kwargs:
        return list(kwargs["tensors"])
    mats = list(args)
    return list(mats[0]) if len(mats) == 1 and isinstance(mats[0], (list, tuple)) else mats


@register_macs(torch.linalg.multi_dot, torch.chain_matmul)
def _chain_macs(args: tuple, kwargs: dict, out: Any) -> int:
    mats = _chain_mats(args, kwargs)
    return chain_order(mats)[1] if len(mats) >= 2 else 0


@register(torch.linalg.multi_dot)
def answer_multi_dot(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    mats = _chain_mats(args, kwargs)
    out = kwargs.get("out")
    if len(mats) < 2:
        return func(*args, **kwargs)
    return _finish(_chain(frame, mats), out)


@register(torch.chain_matmul)
def answer_chain_matmul(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    mats = _chain_mats(args, kwargs)
    if len(mats) < 2:
        return func(*args, **kwargs)
    return _finish(_chain(frame, mats), kwargs.get("out"))


@register(torch.linalg.matmul)
def answer_linalg_matmul(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    a, b, out = _two(*args, **kwargs)
    return _finish(device_matmul(frame, a, b), out)


# ----------------------------------------------------------------------------- matrix powers
def _matrix_power_args(input, n, *, out=None):
    return input, n, out


#: ``A^n`` for ``n < 0``: ``inv(A)`` (inside LAPACK: no analog model), then its power
MATRIX_POWER_NEGATIVE = "torch.linalg.matrix_power with n < 0"


@register(torch.linalg.matrix_power, torch.matrix_power, torch.Tensor.matrix_power)
def answer_matrix_power(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    """``A^n`` (batched, square ``A``) by torch's binary exponentiation, each product on the device:
    for each bit of ``n`` from the lowest, ``z = z @ z`` (``z = A`` first), and where the bit is set
    ``r = r @ z`` (``r = z`` first): ``floor(log2 n) + popcount(n) - 1`` products. ``n < 2`` (the
    identity, ``A`` itself) as torch does; ``n < 0`` (the inverse, inside LAPACK, then its power) runs as torch
    computes it, named and counted digital (``n^3`` for the inverse plus the power's products)."""
    a, n, out = _matrix_power_args(*args, **kwargs)
    n = int(n)
    if n < 0 and isinstance(a, Tensor) and a.dim() >= 2:  # an inverse, then its power: named, counted digital
        warn_digital(frame, MATRIX_POWER_NEGATIVE)
        return digital_call(frame, func, args, kwargs, "no analog model", name=MATRIX_POWER_NEGATIVE)
    if n < 2 or not isinstance(a, Tensor) or a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        return func(*args, **kwargs)
    z: Tensor | None = None
    r: Tensor | None = None
    while n > 0:
        bit, n = n % 2, n // 2
        z = a if z is None else device_matmul(frame, z, z)
        if bit:
            r = z if r is None else device_matmul(frame, r, z)
    assert r is not None
    return _finish(r, out)


# ----------------------------------------------------------------------------- einsum
def _einsum_operands(args: tuple) -> tuple[str, list[Tensor]]:
    eq = args[0]
    ops = args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    return eq, list(ops)


@register(torch.einsum)
def answer_einsum(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    eq, ops = _einsum_operands(args)
    if len(ops) < 2 or kwargs or not all(isinstance(o, Tensor) for o in ops):
        return func(*args, **kwargs)  # one operand: a trace, sum or permutation, not a product
    subs, out = einsum_subscripts(eq, ops)
    cur_s, cur = subs[0], ops[0]
    for i in range(1, len(ops)):
        later = set(out).union(*subs[i + 1:])
        keep = "".join(dict.fromkeys(c for c in cur_s + subs[i] if c in later))
        a3, b3, finish = einsum_pair(cur_s, subs[i], keep, cur, ops[i])
        cur, cur_s = finish(device_matmul(frame, a3, b3)), keep
    if cur_s != out:
        cur = cur.permute([cur_s.index(c) for c in out])
    return cur


@register_macs(torch.einsum)
def _einsum_macs(args: tuple, kwargs: dict, out: Any) -> int:
    """MACs of an einsum as :func:`answer_einsum` computes it: pairwise, left to right, each
    contraction one product over the union of its operands' indices (indices private to one
    operand summed first, no MACs; a K = 1 contraction, ``i,j->ij``, is a product too)."""
    eq, ops = _einsum_operands(args)
    if len(ops) < 2 or not all(isinstance(o, Tensor) for o in ops):
        return 0
    subs, out_s = einsum_subscripts(eq, ops)
    sizes: dict[str, int] = {}
    for sub, op in zip(subs, ops):
        for ch, n in zip(sub, op.shape):
            sizes[ch] = max(sizes.get(ch, 1), int(n))
    cur, macs = subs[0], 0
    for i in range(1, len(ops)):
        later = set(out_s).union(*subs[i + 1:])
        keep = "".join(dict.fromkeys(c for c in cur + subs[i] if c in later))
        used = {c for c in cur if c in subs[i] or c in keep} | {c for c in subs[i] if c in cur or c in keep}
        macs += math.prod(sizes[c] for c in used)
        cur = keep
    return macs


# ----------------------------------------------------------------------------- bilinear
def _bilinear_args(input1, input2, weight, bias=None):
    return input1, input2, weight, bias


@register(F.bilinear, torch.bilinear)
def answer_bilinear(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    x1, x2, w, bias = _bilinear_args(*args, **kwargs)
    if w.dim() != 3 or x1.shape[-1] != w.shape[1] or x2.shape[-1] != w.shape[2] or x1.shape[:-1] != x2.shape[:-1]:
        return func(*args, **kwargs)  # torch raises its own error
    o, i1, i2 = w.shape
    lead = x1.shape[:-1]
    # product 1: u[., o*i2 + j] = sum_i x1[., i] w[o, i, j]  (static weight rows w[o, :, j])
    w_rows = w.permute(0, 2, 1).reshape(o * i2, i1)
    u = device_weight_product(frame, x1.reshape(-1, i1), w_rows).reshape(-1, o, i2)
    # product 2: y[., o] = sum_j u[., o, j] x2[., j]  (activation by activation)
    y = device_matmul(frame, u, x2.reshape(-1, i2, 1)).reshape(*lead, o)
    if bias is not None:
        y = y + bias
    return y


# ----------------------------------------------------------------------------- weighted embedding bags
def _embedding_bag_args(input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False,
                        mode="mean", sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
    return input, weight, per_sample_weights, padding_idx


@register_macs(F.embedding_bag)
def _embedding_bag_macs(args: tuple, kwargs: dict, out: Any) -> int:
    """``sum_l w[l] E[idx[l]]``: one product of ``D`` MACs per index that is not ``padding_idx``
    (torch skips those); a bag without ``per_sample_weights`` (a sum, mean or max of rows) is no product."""
    idx, weight, psw, pad = _embedding_bag_args(*args, **kwargs)
    if psw is None:
        return 0
    n = idx.numel() if pad is None else int((idx != pad % weight.shape[0]).sum())
    return n * weight.shape[1]


EMBEDDING_BAG_PSW = "torch.nn.functional.embedding_bag with per_sample_weights"


@register(F.embedding_bag)
def answer_embedding_bag(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    """An embedding bag's look-ups stay digital (README: embedding look-ups). With
    ``per_sample_weights`` its sum ``y[b] = sum_l w[b, l] E[idx[b, l]]`` is a product of a sparse
    row (the weights at the looked-up indices) by the table: like every sparse product it has no
    analog model, so it runs as torch computes it, named in a ``DigitalProductWarning`` and
    counted as digital (``idx.numel() x D`` MACs)."""
    if _embedding_bag_args(*args, **kwargs)[2] is None:
        return func(*args, **kwargs)
    warn_digital(frame, EMBEDDING_BAG_PSW)
    return digital_call(frame, func, args, kwargs, "no analog model", name=EMBEDDING_BAG_PSW)


# ----------------------------------------------------------------------------- in-place forms
def _in_place(answer: Callable[[Frame, Callable, tuple, dict], Tensor]) -> Callable[[Frame, Callable, tuple, dict], Tensor]:
    """The handler of an in-place form (``t.addmm_(a, b)``) from its out-of-place one: the same
    device products, then the result written into ``t``, which must have its shape (as torch
    requires)."""

    def answer_in_place(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        target, result = args[0], answer(frame, func, args, kwargs)
        if result.shape != target.shape:
            raise RuntimeError(f"Bad in-place call: input tensor size {list(target.shape)} and output tensor size "
                               f"{list(result.shape)} should match")
        return target.copy_(result)

    return answer_in_place


for _func, _answer in ((torch.Tensor.addmm_, answer_addmm), (torch.Tensor.addmv_, answer_addmv),
                       (torch.addmv_, answer_addmv), (torch.Tensor.baddbmm_, answer_baddbmm),
                       (torch.Tensor.addbmm_, answer_addbmm), (torch.Tensor.addr_, answer_addr)):
    register(_func)(_in_place(_answer))
