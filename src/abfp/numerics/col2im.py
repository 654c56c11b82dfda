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
    """:func:`col2im_reference` in one compiled pass over the output where numba runs (float32,
    CPU), else that function itself: the same values, signs of zero included."""
    if not (fused.usable() and g.dtype == torch.float32 and g.device.type == "cpu"):
        return col2im_reference(g, padded_hw, k, stride, dilation)
    g = g.contiguous()
    b, ho, wo, c, kk = g.shape
    out = torch.empty(b, *padded_hw, c, dtype=torch.float32)
    fused.set_threads()
    _col2im_kernel(fused.as_numpy(g), *k, *stride, *dilation, fused.as_numpy(out))
    return out


if fused.AVAILABLE:
    from numba import njit, prange

    _jit: Any = dict(cache=True, nogil=True, error_model="numpy")

    @njit(parallel=True, **_jit)
    def _col2im_kernel(g, kh, kw, sh, sw, dh, dw, out):
        """``out[b, y, x, :]``: the offsets' patch gradients summed last offset first, the first
        term as is, ``+ 0.0`` for an offset that does not reach ``(y, x)`` (see the module)."""
        b, ho, wo, c, kk = g.shape
        hp, wp = out.shape[1], out.shape[2]
        for by in prange(b * hp):
            ib = by // hp
            y = by % hp
            for x in range(wp):
                acc = out[ib, y, x]
                for o in range(kk - 1, -1, -1):
                    i = o // kw
                    j = o - i * kw
                    ry = y - i * dh
                    rx = x - j * dw
                    inside = ry >= 0 and rx >= 0 and ry % sh == 0 and rx % sw == 0 and ry // sh < ho and rx // sw < wo
                    if o == kk - 1:
                        if inside:
                            src = g[ib, ry // sh, rx // sw]
                            for ch in range(c):
                                acc[ch] = src[ch, o]
                        else:
                            for ch in range(c):
                                acc[ch] = np.float32(0.0)
                    elif inside:
                        src = g[ib, ry // sh, rx // sw]
                        for ch in range(c):
                            acc[ch] += src[ch, o]
                    else:
                        for ch in range(c):
                            acc[ch] += np.float32(0.0)
