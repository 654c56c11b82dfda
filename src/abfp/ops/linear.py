"""The linear family: ``F.linear`` (static weights) and activation-by-activation matrix
products (``torch.matmul``, ``@``, ``bmm``, ``mm``; a two-operand ``einsum``) on the device.

Per family: the argument parser (:func:`linear_args`), the public functions (:func:`linear`,
:func:`matmul`, :func:`einsum`, re-exported by :mod:`abfp.functional`), the MAC/tile accounting
(``K`` = the reduction length, ``MACs = rows * N * K``) and the handlers that answer the torch
functions inside converted modules. Both the reference and the fast path are
:func:`abfp.ops.device.product` (it picks by ``config.kernel``).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ABFPConfig
from ..numerics import ProductStats
from .device import (WEIGHT_CACHE, NotTraceable, bf16, check_finite, generator_for, product, promoted_dtype, traced_product,
                     tracing, without_bf16_io)
from .registry import register
from .site import Frame, digital_call, run_product

__all__ = ["linear", "matmul", "einsum", "linear_args", "is_weight", "answer_linear", "answer_matmul", "answer_rmatmul"]


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    config: ABFPConfig,
    input_scale: float | Tensor | None = None,
    weight_scale: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    stats: ProductStats | None = None,
    cache: bool = True,
) -> Tensor:
    """``y = x W^T + b`` on the device; ``x``: (..., K), ``weight``: (N, K), ``bias``: (N,).

    In ``fixed`` mode ``input_scale`` and ``weight_scale`` are the static per-tensor scales
    (default: each tensor's own max |value| over the whole call). Weight encodings are cached
    per weight value (``cache=False`` re-encodes every call). Bias is added digitally in
    float32: ``y = Y + b``; with ``bf16_io`` the inputs and weights are rounded to bfloat16 and
    the output after the bias, ``y = bf16(Y + b)`` (SPEC 1 step 7). Under a tracer the product
    is the custom operator ``abfp::device`` (:mod:`abfp.ops.custom`), which checks the operands.
    """
    traced = tracing()
    if not traced:
        check_finite(x, "input")
        if not cache:
            check_finite(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input's last dimension ({x.shape[-1] if x.dim() else 'scalar'}) must equal weight's in_features ({weight.shape[1]})"
        )
    if bias is not None:
        if traced:
            torch._assert_async(torch.isfinite(bias).all(), "bias contains NaN or Inf; the analog device cannot encode it")
        else:
            check_finite(bias, "bias")
    out_dtype = x.dtype
    lead = x.shape[:-1]
    x3 = x.reshape(1, math.prod(lead), x.shape[-1])
    w3 = weight.unsqueeze(0)
    weights = WEIGHT_CACHE.get(weight, w3, config, weight_scale) if cache and not traced else None
    device = config
    if config.bf16_io and bias is not None:
        # round the inputs here and the output after the bias (not before it)
        device, x3, w3 = without_bf16_io(config), bf16(x3), bf16(w3)
    if traced:
        if stats is not None:
            raise NotTraceable("a product with ADC statistics (abfp.summary recording) cannot be traced")
        # the 2-D weight itself, so that the operator caches its encoding per weight value
        y = traced_product(x3, weight if cache else w3, device, input_scale=input_scale, weight_scale=weight_scale,
                           generator=generator_for(config, generator, x.device),
                           weight_config=config if cache else None)
    else:
        y = product(x3, w3, device, input_scale=input_scale, weight_scale=weight_scale,
                    generator=generator, weights=weights, stats=stats)
    y = y.reshape(*lead, weight.shape[0])
    if bias is not None:
        y = y + bias.to(torch.float32) if traced else y.add_(bias.to(torch.float32))  # y is this call's own tensor
        if config.bf16_io:
            y = bf16(y)
    return y.to(out_dtype)


def matmul(
    a: Tensor,
    b: Tensor,
    *,
    config: ABFPConfig,
    generator: torch.Generator | None = None,
    stats: ProductStats | None = None,
    a_scale: float | Tensor | None = None,
    b_scale: float | Tensor | None = None,
) -> Tensor:
    """``torch.matmul(a, b)`` on the device, batch dims broadcast; both operands get dynamic
    block scales along the reduction axis. In ``fixed`` mode ``a_scale``/``b_scale`` are the
    static per-tensor scales (default: each tensor's max |value|)."""
    if not tracing():  # traced: checked inside the operator
        check_finite(a, "first operand")
        check_finite(b, "second operand")
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError("matmul needs operands of at least one dimension")
    out_dtype = promoted_dtype(a, b)
    squeeze_a = a.dim() == 1
    squeeze_b = b.dim() == 1
    if squeeze_a:
        a = a.unsqueeze(0)
    if squeeze_b:
        b = b.unsqueeze(-1)
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul shapes do not match: {tuple(a.shape)} @ {tuple(b.shape)}")
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    nb = math.prod(batch)  # not -1: a product with zero rows or columns has no size to infer
    a3 = a.expand(*batch, M, K).reshape(nb, M, K)
    w3 = b.expand(*batch, K, N).transpose(-1, -2).reshape(nb, N, K)
    y = product(a3, w3, config, input_scale=a_scale, weight_scale=b_scale,
                 generator=generator, stats=stats).reshape(*batch, M, N)
    if squeeze_a:
        y = y.squeeze(-2)
    if squeeze_b:
        y = y.squeeze(-1)
    return y.to(out_dtype)


def einsum(
    equation: str,
    a: Tensor,
    b: Tensor,
    *,
    config: ABFPConfig,
    generator: torch.Generator | None = None,
    stats: ProductStats | None = None,
    a_scale: float | Tensor | None = None,
    b_scale: float | Tensor | None = None,
) -> Tensor:
    """A two-operand ``torch.einsum`` whose contraction runs on the device.

    Indices in both operands and the output are batch axes, in both operands only are
    reduced (the analog reduction axis), in one operand and the output are free. Indices
    found in one operand only and not in the output are summed digitally first. In ``fixed``
    mode ``a_scale``/``b_scale`` are the static scales (default: each operand's own max |value|).
    """
    subs, out = einsum_subscripts(equation, [a, b])
    if len(subs) != 2:
        raise ValueError("abfp einsum takes exactly two operands")
    a3, b3, finish = einsum_pair(subs[0], subs[1], out, a, b)
    w3 = b3.transpose(1, 2)  # (batch, N, K): the second operand's rows along the reduction
    if not tracing():  # traced: checked inside the operator
        check_finite(a3, "first operand")
        check_finite(w3, "second operand")
    y = product(a3, w3, config, input_scale=a_scale, weight_scale=b_scale, generator=generator,
                stats=stats).to(promoted_dtype(a, b))
    return finish(y)


def einsum_pair(sa: str, sb: str, out: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """A two-operand contraction ``sa,sb->out`` (explicit subscripts, no ellipsis) as one batched
    matrix product: returns ``a3`` (batch, M, K), ``b3`` (batch, K, N) and ``finish`` that turns
    ``a3 @ b3`` into the einsum's output. Indices in both operands and the output are batch axes,
    in both operands only the reduction (the analog reduction axis, flattened in ``sa``'s order),
    in one operand and the output free; indices in one operand only and not in the output are
    summed digitally first; an index repeated within one operand (``ii,ij->j``) takes that operand's
    diagonal first (a selection, no product)."""
    for which in (0, 1):
        s, other, t = (sa, sb, a) if which == 0 else (sb, sa, b)
        s, t = _einsum_diagonals(s, t)
        private = [i for i, ch in enumerate(s) if ch not in other and ch not in out]
        if private:
            t = t.sum(dim=private)
            s = "".join(ch for i, ch in enumerate(s) if i not in private)
        if which == 0:
            sa, a = s, t
        else:
            sb, b = s, t
    batch = [ch for ch in out if ch in sa and ch in sb]
    red = [ch for ch in sa if ch in sb and ch not in out]
    fa = [ch for ch in sa if ch not in sb]
    fb = [ch for ch in sb if ch not in sa]
    sizes = {ch: a.shape[i] for i, ch in enumerate(sa)}
    for i, ch in enumerate(sb):
        sizes[ch] = max(sizes.get(ch, 1), b.shape[i])
    pa = a.permute([sa.index(ch) for ch in batch + fa + red])
    pb = b.permute([sb.index(ch) for ch in batch + red + fb])
    pa = pa.expand([*[sizes[ch] for ch in batch], *pa.shape[len(batch):]])  # a list: a 0-d operand too
    pb = pb.expand([*[sizes[ch] for ch in batch], *pb.shape[len(batch):]])
    bsz = math.prod(sizes[ch] for ch in batch)
    m, n, k = (math.prod(sizes[ch] for ch in grp) for grp in (fa, fb, red))
    cur = batch + fa + fb

    def finish(y: Tensor) -> Tensor:
        return y.reshape([sizes[ch] for ch in cur]).permute([cur.index(ch) for ch in out])

    return pa.reshape(bsz, m, k), pb.reshape(bsz, k, n), finish


def _einsum_diagonals(s: str, t: Tensor) -> tuple[str, Tensor]:
    """``t`` with subscripts ``s`` where every index repeated in ``s`` is replaced by its diagonal
    (``torch.diagonal`` moves it to the last axis): ``"iji"`` -> ``"ji"``, ``t[a, b, a]``."""
    while len(set(s)) < len(s):
        ch = next(c for c in s if s.count(c) > 1)
        i, j = s.index(ch), s.index(ch, s.index(ch) + 1)
        t = torch.diagonal(t, 0, i, j)
        s = "".join(c for k, c in enumerate(s) if k not in (i, j)) + ch
    return s, t


def einsum_subscripts(eq: str, ops: Sequence[Tensor]) -> tuple[list[str], str]:
    """Explicit subscripts: ellipses expanded to spare letters, the output spelt out."""
    eq = eq.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    parts = lhs.split(",")
    if len(parts) != len(ops):
        raise ValueError(f"einsum(): {len(parts)} subscripts for {len(ops)} operands in {eq!r}")
    used = set(eq.replace(".", "").replace(",", "").replace("-", "").replace(">", ""))
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
    n_ell = max((op.dim() - len(p.replace("...", "")) for p, op in zip(parts, ops) if "..." in p), default=0)
    ell = "".join(spare[:n_ell])
    subs = []
    for p, op in zip(parts, ops):
        if "..." in p:
            k = op.dim() - len(p.replace("...", ""))
            p = p.replace("...", ell[n_ell - k:])
        if len(p) != op.dim():
            raise ValueError(f"einsum(): subscripts {p!r} do not match an operand of {op.dim()} dimensions")
        subs.append(p)
    if not arrow:
        letters = "".join(subs)
        out = ell + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ell))
    else:
        out = out.replace("...", ell)
    return subs, out


# ----------------------------------------------------------------------------- handlers
def linear_args(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``F.linear``'s arguments, positional or by keyword: ``(input, weight, bias)``."""
    return input, weight, bias


def answer_linear(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Any:
    """``F.linear`` inside a converted module: one product, ``K = in_features``,
    ``MACs = rows * out_features * in_features``. A 1-D weight (torch's one output, dropped)
    is the product with one weight row, its output axis squeezed."""
    x, w, b = linear_args(*args, **kwargs)
    if isinstance(x, Tensor) and isinstance(w, Tensor) and (x.dim() == 0 or w.dim() not in (1, 2)):
        raise ValueError(f"abfp: F.linear in module {frame.name or 'the root'!r} needs an input of at least one "
                         f"dimension and a 1-D or 2-D weight, got shapes {tuple(x.shape)} and {tuple(w.shape)}")
    if isinstance(w, Tensor) and w.dim() == 1:
        if b is not None and not (x.dim() == 1 and b.dim() == 0):  # what torch's own F.linear refuses too
            raise ValueError(f"abfp: F.linear in module {frame.name or 'the root'!r} with a 1-D weight takes a bias "
                             f"only with a 1-D input and a 0-d bias, got shapes {tuple(x.shape)} and {tuple(b.shape)}")
        return answer_linear(frame, func, (x, w.unsqueeze(0), b), {}).squeeze(-1)
    rows = x.numel() // max(1, x.shape[-1])
    return run_product(frame, "linear", func, args, kwargs,
                       lambda c, s, stats, g: linear(x, w, b, config=c, input_scale=s[0], generator=g, stats=stats),
                       (x, w), w.shape[1], lambda y: rows * w.shape[0] * w.shape[1])


def is_weight(t: Tensor) -> bool:
    """A static operand: a parameter (or a leaf that requires grad), not an activation."""
    return isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)


def answer_matmul(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Any:
    """``torch.matmul`` (and ``@``, ``bmm``, ``mm``): one product, ``K = a.shape[-1]``,
    ``MACs = y.numel() * K``; a product of two activations (no operand :func:`is_weight`) is
    float32 with ``include_matmul=False``."""
    a, b = args[0], args[1]
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return func(*args, **kwargs)
    if not frame.state.include_matmul and not (is_weight(a) or is_weight(b)):
        return digital_call(frame, func, args, kwargs, "include_matmul=False")
    return run_product(frame, "matmul", func, args, kwargs,
                       lambda c, s, stats, g: matmul(a, b, config=c, generator=g, stats=stats, a_scale=s[0], b_scale=s[1]),
                       (a, b), a.shape[-1], lambda y: y.numel() * a.shape[-1])


def answer_rmatmul(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Any:
    """``b.__rmatmul__(a)``, i.e. ``a @ b``."""
    b, a = args[0], args[1]
    return answer_matmul(frame, torch.matmul, (a, b), {})


register(F.linear)(answer_linear)
# operator.matmul: what dynamo (torch.compile, strict torch.export) hands the mode for ``a @ b``
register(torch.matmul, Tensor.matmul, Tensor.__matmul__, operator.matmul, torch.bmm, Tensor.bmm, torch.mm,
         Tensor.mm)(answer_matmul)
register(Tensor.__rmatmul__)(answer_rmatmul)
