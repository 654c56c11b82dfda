"""The straight-through operand of the QAT backward, compiled: rows dequantised block by block.

For rows ``v`` (R, K) and tiles of width ``n`` (the last one ``K - (T-1) n`` wide), with the
block scale ``s[r, t] = fmt(max |v[r, t n : t n + n]|)`` in the scale format (``fmt``:
:func:`.blocks.round_scale`) and ``L`` the DAC's largest code,

    q[r, k] = round(clamp(v[r, k] / s, -1, 1) * L) * (s / L)     (s > 0),   +0.0 (s = 0),

each operation in float32 as :func:`abfp.ops.device.dequantised_rows` does it with torch
(a division, a clamp, a multiply, round half to even, a multiply by ``s / L``): the same bits
(``tests/numerics/test_dequant.py``). One pass for the block maxima, one for ``q``, instead of
the torch path's copy, two reductions and five element-wise passes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import fused
from .blocks import round_scale

__all__ = ["usable", "dequantise_rows"]


def usable(v: Tensor) -> bool:
    """The compiled kernels can take ``v``: float32 on the CPU, and numba usable here."""
    return fused.usable() and v.dtype == torch.float32 and v.device.type == "cpu"


def dequantise_rows(v: Tensor, n: int, scale_dtype: str, max_code: int, out: Tensor | None = None) -> Tensor:
    """``q`` (R, K) of rows ``v`` (R, K) (see the module; :func:`usable` must hold), in ``out``
    (contiguous float32 (R, K)) or a new tensor."""
    v = v.contiguous()
    R, K = v.shape
    T = -(-K // n) if K else 0
    mx = torch.empty(R, T, dtype=torch.float32)
    q = torch.empty(R, K, dtype=torch.float32) if out is None else out
    if R == 0 or K == 0:
        return q
    fused.set_threads()
    vn = fused.as_numpy(v)
    fused.rows_block_max(vn, n, fused.as_numpy(mx))
    s = round_scale(mx, scale_dtype).contiguous()
    _dequant_kernel(vn, n, fused.as_numpy(s), np.float32(max_code), fused.as_numpy(q))
    return q


def dequantise_patches(xpad: Tensor, groups: int, k: tuple[int, int], stride: tuple[int, int],
                       dilation: tuple[int, int], out_hw: tuple[int, int], n: int, scale_dtype: str, max_code: int,
                       out: Tensor) -> Tensor:
    """:func:`dequantise_rows` of a convolution's patches straight from the padded input ``xpad``
    (B, C, Hp, Wp), never building them: ``out`` (G, B*Ho*Wo, C/G*kh*kw) receives row
    ``(b, h, w)`` of group ``g``, its reduction index ``(c, i, j)`` the value
    ``xpad[b, g C/G + c, h s_h + i d_h, w s_w + j d_w]`` dequantised (the patches of
    :func:`abfp.ops.conv._im2col`). Scale formats ``"bfloat16"`` and ``"float32"`` (the block
    max rounded to nearest even bfloat16 by bit operations, as torch converts)."""
    if scale_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dequantise_patches takes bfloat16 or float32 scales, not {scale_dtype!r}")
    G, M, kg = out.shape
    scales = torch.empty(G, M, -(-kg // n), dtype=torch.float32)
    fused.set_threads()
    _patch_kernel(fused.as_numpy(xpad.contiguous()), groups, *k, *stride, *dilation, *out_hw, n,
                  scale_dtype == "bfloat16", np.float32(max_code), fused.as_numpy(scales), fused.as_numpy(out))
    return out


if fused.AVAILABLE:
    from numba import njit, prange

    _jit: Any = dict(cache=True, nogil=True, error_model="numpy")

    @njit(parallel=True, **_jit)
    def _dequant_kernel(v, n, s, lx, out):
        """``out[r, k] = rint(clamp(v[r, k] / s, -1, 1) * lx) * (s / lx)`` with ``s = s[r, k // n]``; 0 where ``s`` is 0."""
        R, K = v.shape
        T = s.shape[1]
        for r in prange(R):
            for t in range(T):
                sc = s[r, t]
                k0 = t * n
                k1 = min(K, k0 + n)
                src = v[r, k0:k1]
                dst = out[r, k0:k1]
                if sc > 0:
                    step = sc / lx
                    for k in range(src.shape[0]):
                        x = src[k] / sc
                        x = np.float32(-1.0) if x < np.float32(-1.0) else x  # clamp (as selects: vectorised)
                        x = np.float32(1.0) if x > np.float32(1.0) else x
                        dst[k] = np.rint(x * lx) * step
                else:
                    for k in range(src.shape[0]):
                        dst[k] = np.float32(0.0)

    @njit(parallel=True, **_jit)
    def _patch_kernel(x, G, kh, kw, sh, sw, dh, dw, ho, wo, n, bf16, lx, scales, out):
        """``out[g, m]``: the dequantised patch row ``m = (b, h, w)`` of group ``g`` (see
        :func:`dequantise_patches`): gathered, block maxima (``scales[g, m]``, in the scale
        format), ``q`` as :func:`_dequant_kernel` computes it."""
        B, C = x.shape[0], x.shape[1]
        cg = C // G
        kk = kh * kw
        kg = cg * kk
        T = scales.shape[2]
        M = B * ho * wo
        for gbh in prange(G * B * ho):  # one output row (g, b, h): its wo patch rows in L1
            g = gbh // (B * ho)
            b = (gbh // ho) % B
            h = gbh % ho
            m0 = (b * ho + h) * wo
            blk = out[g, m0 : m0 + wo]
            for c in range(cg):
                plane = x[b, g * cg + c]
                for i in range(kh):
                    src = plane[h * sh + i * dh]
                    for j in range(kw):
                        col = c * kk + i * kw + j
                        for w in range(wo):
                            blk[w, col] = src[w * sw + j * dw]
            for w in range(wo):
                _dequant_patch_row(blk[w], scales[g, m0 + w], n, kg, T, bf16, lx)

    @njit(inline="always", **_jit)
    def _dequant_patch_row(dst, sc, n, kg, T, bf16, lx):
        """One gathered patch row in place: block maxima into ``sc`` (scale format), then ``q``."""
        for t in range(T):
            seg = dst[t * n : min(kg, t * n + n)]
            mx = np.float32(0.0)
            for q in range(seg.shape[0]):
                a = abs(seg[q])
                mx = a if a > mx else mx
            sc[t] = mx
        if bf16:
            u = sc.view(np.uint32)
            for t in range(T):
                u[t] = min((u[t] + np.uint32(0x7FFF) + ((u[t] >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000),
                           np.uint32(0x7F7F0000))  # saturating at the largest finite bfloat16
        for t in range(T):
            seg = dst[t * n : min(kg, t * n + n)]
            s = sc[t]
            if s > 0:
                step = s / lx
                for q in range(seg.shape[0]):
                    r = seg[q] / s
                    r = np.float32(-1.0) if r < np.float32(-1.0) else r
                    r = np.float32(1.0) if r > np.float32(1.0) else r
                    seg[q] = np.rint(r * lx) * step
            else:
                for q in range(seg.shape[0]):
                    seg[q] = np.float32(0.0)
