"""col2im in autograd's order: the input gradient of a convolution from its patch gradients.

A convolution's patches are ``cols[b, h, w, c, o] = xpad[b, h s_h + i d_h, w s_w + j d_w, c]``
for kernel offset ``o = i k_w + j`` (channels last, as :func:`abfp.ops.conv._im2col` stacks
them). Given the patch gradients ``g`` of the same shape, the padded input's gradient is

    gxpad[b, y, x, c] = sum over o = O-1, O-2, ..., 0 of  a_o,
    a_o = g[b, h, w, c, o] where (y, x) = (h s_h + i d_h, w s_w + j d_w), else +0.0,

summed in float32 left to right, the first term taken as is: exactly what autograd computes
for ``torch.stack`` of the offsets' slices (each slice's backward is a zero tensor with the
slice copied in; the engine runs the last offset's backward first and adds each further one
into the buffer, adding ``+0.0`` where that offset does not reach, which turns a ``-0.0`` into
``+0.0``). :func:`col2im_reference` is that computation in torch; :func:`col2im` the compiled
one pass (numba), the same bits (``tests/numerics/test_col2im.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import fused

__all__ = ["col2im", "col2im_reference"]


def _windows(ho: int, wo: int, k: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]):
    """``(o, row slice, column slice)`` of each kernel offset in the padded input, last offset first."""
    (kh, kw), (sh, sw), (dh, dw) = k, stride, dilation
    for o in reversed(range(kh * kw)):
        i, j = divmod(o, kw)
        yield o, slice(i * dh, i * dh + sh * (ho - 1) + 1, sh), slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)


def col2im_reference(g: Tensor, padded_hw: tuple[int, int], k: tuple[int, int], stride: tuple[int, int],
                     dilation: tuple[int, int]) -> Tensor:
    """``gxpad`` (B, Hp, Wp, C) from patch gradients ``g`` (B, Ho, Wo, C, kh*kw), as autograd sums
    the backward of the offsets' slices: a zero tensor per offset with its slice copied in, the
    last offset first, each further one added to the whole buffer."""
    b, ho, wo, c, _ = g.shape
    out = None
    for o, rows, cols in _windows(ho, wo, k, stride, dilation):
        part = torch.zeros(b, *padded_hw, c, dtype=g.dtype, device=g.device)
        part[:, rows, cols].copy_(g[..., o])
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


def col2im(g: Tensor, padded_hw: tuple[int, int], k: tuple[int, int], stride: tuple[int, int],
           dilation: tuple[int, int]) -> Tensor:
    """:func:`col2im_reference` in one compiled pass over ``g`` where numba runs (float32, CPU),
    else that function itself: the same values, signs of zero included.

    The kernel scatters ``g`` in its own order (``h``, then ``w`` ascending), which adds the
    offsets reaching an output in descending order, as autograd does. The ``+0.0`` autograd adds
    for each offset that does not reach an output only turns a ``-0.0`` sum into ``+0.0``; so
    the outputs every offset reaches start at ``-0.0`` (``-0.0 + v = v``: the first term as
    is) and the others at ``+0.0``."""
    if not (fused.usable() and g.dtype == torch.float32 and g.device.type == "cpu"):
        return col2im_reference(g, padded_hw, k, stride, dilation)
    g = g.contiguous()
    hp, wp = padded_hw
    out = torch.zeros(g.shape[0], hp, wp, g.shape[3], dtype=torch.float32)
    rows, cols = _reached_by_all(hp, g.shape[1], k[0], stride[0], dilation[0]), _reached_by_all(wp, g.shape[2], k[1], stride[1], dilation[1])
    if rows and cols:
        out[:, rows[0] : rows[1] + 1 : rows[2], cols[0] : cols[1] + 1 : cols[2]] = -0.0
    fused.set_threads()
    _col2im_kernel(fused.as_numpy(g), *k, *stride, *dilation, fused.as_numpy(out))
    return out


def _reached_by_all(size: int, n_out: int, k: int, s: int, d: int) -> tuple[int, int, int] | None:
    """``(first, last, step)`` of the padded positions ``p < size`` that every kernel offset ``i``
    reaches (``p = o s + i d`` for some output ``0 <= o < n_out``), or ``None``: they form one
    arithmetic progression (every ``p`` congruent to each ``i d`` modulo ``s``)."""
    hits = [p for p in range(size) if all((p - i * d) % s == 0 and 0 <= (p - i * d) // s < n_out for i in range(k))]
    if not hits:
        return None
    step = hits[1] - hits[0] if len(hits) > 1 else 1
    assert hits == list(range(hits[0], hits[-1] + 1, step))
    return hits[0], hits[-1], step


if fused.AVAILABLE:
    from numba import njit, prange

    _jit: Any = dict(cache=True, nogil=True, error_model="numpy")

    @njit(parallel=True, **_jit)
    def _col2im_kernel(g, kh, kw, sh, sw, dh, dw, out):
        """``out[b, h s_h + i d_h, w s_w + j d_w, c] += g[b, h, w, c, i kw + j]``, ``g`` read in order."""
        b, ho, wo, c, kk = g.shape
        for ib in prange(b):
            for h in range(ho):
                for w in range(wo):
                    src = g[ib, h, w]
                    for o in range(kk):
                        i = o // kw
                        j = o - i * kw
                        dst = out[ib, h * sh + i * dh, w * sw + j * dw]
                        for ch in range(c):
                            dst[ch] += src[ch, o]
