"""Tiles of width 8 on AVX-512 VNNI: a convolution's tile products as int8 dot products.

:func:`.fused.narrow_cols8` forms each tile product of width 8 with eight float32 fused
multiply-adds per sample on float32 codes, in numba's vector loops (256-bit on this CPU).
Here the same numbers come from ``vpdpbusd`` (unsigned bytes times signed bytes, four
products summed into each 32-bit lane): two instructions give sixteen exact 8-term tile
products ``D`` of one output channel. The loop body is written as LLVM vector
instructions on sixteen positions at a time (:func:`_stripe8`, numba cannot emit
``vpdpbusd``), in the manner of :mod:`abfp.finetune.avx512_block`:

- the patch codes ``x`` (int8, one row per reduction index) of eight rows are interleaved
  into two vectors of sixteen 32-bit lanes, four codes of one position per lane, and
  offset to unsigned bytes ``x + 128`` (``xor 0x80``); each tile's two vectors go to a
  small buffer once per sixteen positions and serve every output channel;
- ``D = vpdpbusd(vpdpbusd(c, x_lo, w_lo), x_hi, w_hi)`` with ``w_lo``, ``w_hi`` the
  channel's eight weight codes (signed bytes, broadcast) and ``c = -128 sum_k w_k``, which
  takes the offset back out: exact in int32, and then exact as float32 (``|D| <= 8 127 127``);
- then :func:`.fused.narrow_cols8`'s ADC, in its order, with its float32 operations, no
  fused multiply-add: ``r = D / den`` (one correctly rounded division; ``den`` is
  :meth:`~.adc.AdcPlan.int_ratio`'s divisor, the multiplier being 1), plus the noise of
  :func:`.fused._adc1` (the four 16-bit lanes of one splitmix64 output, one per channel of
  a group of four), clamp, round to nearest even, ``(code * s) * w``, and the float32 tile
  sum in the order ``t = 0, 1, ...``, held in registers over the tiles of four channels.

:func:`narrow_rows8_vnni` does the same for the rows of a product (linear layers, attention)
in place of :func:`.fused.narrow_rows`: the weights are the unsigned operand there (words of
:func:`pack_rows`, ``w + 128``), the input codes of a row the broadcast signed one, and
``-128 sum_k x_k`` per row and tile takes the offset out; 32 columns of up to four rows at a time.

:func:`narrow_cols8_vnni` takes :func:`.fused.narrow_cols8`'s arguments, but int8 patch codes
and the packed weight words of :func:`pack_weights`; it reads up to fifteen positions past
the stripe's end in ``codes`` and ``sx`` (the caller leaves that slack), whose results it
drops. :data:`USABLE`: numba compiles for this machine's CPU and the CPU has AVX-512 (F,
BW) with VNNI; elsewhere the caller keeps :func:`.fused.narrow_cols8` (same numbers: tested
in ``tests/numerics/test_vnni8.py``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import fused

__all__ = ["USABLE", "narrow_cols8_vnni", "narrow_rows8_vnni", "pack_rows", "pack_weights"]

#: the VNNI kernel may run in this process (module text); ``ABFP_VNNI8=0`` turns it off
USABLE = (os.environ.get("ABFP_VNNI8", "") != "0"
          and all(fused.host_cpu_has(f) for f in ("avx512f", "avx512bw", "avx512vnni")))

narrow_cols8_vnni: Any = None
narrow_rows8_vnni: Any = None


def pack_weights(codes_i8: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Weight codes (G, T, 8, Ng) int8 -> ``(words, corr)``: ``words`` (G, T, Ng, 2) int32, the
    codes ``k = 0..3`` and ``4..7`` of each channel as four bytes of one word (little-endian:
    byte ``j`` is code ``4 h + j``), and ``corr`` (G, T, Ng) int32 ``= -128 sum_k w_k``."""
    if codes_i8.dtype != torch.int8 or codes_i8.dim() != 4 or codes_i8.shape[2] != 8:
        raise ValueError(f"pack_weights needs (G, T, 8, Ng) int8 codes, got {tuple(codes_i8.shape)} {codes_i8.dtype}")
    w = codes_i8.permute(0, 1, 3, 2).contiguous()  # (G, T, Ng, 8)
    words = w.view(torch.int32).numpy()  # the eight bytes of a channel: two words
    corr = (w.to(torch.int32).sum(-1) * -128).to(torch.int32).contiguous().numpy()
    return words, corr


def pack_rows(codes_i8: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Weight codes (Bw, T, 8, N) int8 and scales (Bw, T, N) -> ``(words, scales)`` for
    :func:`narrow_rows8_vnni`, ``N`` padded to a multiple of 32 (``Np``) with zero codes and scales:
    ``words`` (Bw, T, 2, Np) int32, the codes ``4 h .. 4 h + 3`` of column ``j`` as the four bytes of
    word ``[., ., h, j]``, each offset to an unsigned byte ``w + 128``; ``scales`` (Bw, T, Np)."""
    if codes_i8.dtype != torch.int8 or codes_i8.dim() != 4 or codes_i8.shape[2] != 8:
        raise ValueError(f"pack_rows needs (Bw, T, 8, N) int8 codes, got {tuple(codes_i8.shape)} {codes_i8.dtype}")
    bw, t, _, n = codes_i8.shape
    if scales.shape != (bw, t, n):
        raise ValueError(f"pack_rows: scales {tuple(scales.shape)} do not match codes {tuple(codes_i8.shape)}")
    pad = -n % 32
    u = torch.nn.functional.pad(codes_i8, (0, pad)).view(torch.uint8) ^ 0x80  # w + 128 (w in -127..127)
    words = u.reshape(bw, t, 2, 4, n + pad).permute(0, 1, 2, 4, 3).contiguous().view(torch.int32)
    return words.reshape(bw, t, 2, n + pad), torch.nn.functional.pad(scales.to(torch.float32), (0, pad)).contiguous()


if USABLE:
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .fused import _GOLDEN, _MIX1, _MIX2, stripe_out, stripe_positions

    _I1, _I8, _I16, _I32, _I64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
    _F = ir.FloatType()
    _V16 = [ir.VectorType(t, 16) for t in (_I1, _I8, _I16, _I32, _I64, _F)]
    _B16, _C16, _H16, _W16, _Q16, _F16 = _V16
    _VDP = "llvm.x86.avx512.vpdpbusd.512"

    def _splat(builder: Any, x: Any, vec: Any) -> Any:
        one = builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(_I32, vec.count),
                                                                                     [0] * vec.count))

    def _declare(module: Any, name: str, fnty: Any) -> Any:
        fn = module.globals.get(name)
        return fn if fn is not None else ir.Function(module, fnty, name=name)

    def _byte_ptr(builder: Any, data: Any, offset: Any, ty: Any) -> Any:
        """``data + offset`` bytes, as a pointer to ``ty``."""
        p = builder.gep(builder.bitcast(data, _I8.as_pointer()), [offset])
        return builder.bitcast(p, ty.as_pointer())

    def _is(t: Any, ndim: int, dtype: Any) -> bool:
        return isinstance(t, types.Array) and t.ndim == ndim and t.dtype == dtype

    def _splitmix(builder: Any, z: Any) -> Any:
        """splitmix64's mix of the 64-bit lanes of ``z`` (``key + counter * golden``)."""
        vt = z.type

        def const(v: int) -> Any:
            return ir.Constant(vt, [v] * vt.count) if isinstance(vt, ir.VectorType) else ir.Constant(vt, v)

        for sh, mul in ((30, int(_MIX1)), (27, int(_MIX2)), (31, None)):
            z = builder.xor(z, builder.lshr(z, const(sh)))
            if mul is not None:
                z = builder.mul(z, const(mul))
        return z

    class _Adc:
        """The ADC of :func:`.fused.narrow_cols8` / :func:`.fused.narrow_rows` on sixteen
        samples, as LLVM vector instructions (module text); one per compiled function."""

        def __init__(self, builder: Any, den: Any, step: Any, ly: Any, noisy: bool, count: bool) -> None:
            mod = builder.module
            self.b, self.noisy, self.count = builder, noisy, count
            self.vdp = _declare(mod, _VDP, ir.FunctionType(_W16, [_W16, _W16, _W16]))
            self.rint = _declare(mod, "llvm.rint.v16f32", ir.FunctionType(_F16, [_F16]))
            self.vrange = _declare(mod, "llvm.x86.avx512.mask.range.ps.512",
                                   ir.FunctionType(_F16, [_F16, _F16, _I32, _F16, _I16, _I32]))
            self.ctpop = _declare(mod, "llvm.ctpop.i16", ir.FunctionType(_I16, [_I16]))
            self.den, self.step, self.ly = (_splat(builder, v, _F16) for v in (den, step, ly))
            self.clipped = cgutils.alloca_once_value(builder, ir.Constant(_I64, 0))

        def dot(self, c: Any, a_lo: Any, b_lo: Any, a_hi: Any, b_hi: Any) -> Any:
            """``vpdpbusd(vpdpbusd(c, a_lo, b_lo), a_hi, b_hi)``: exact 8-term tile products."""
            return self.b.call(self.vdp, [self.b.call(self.vdp, [c, a_lo, b_lo]), a_hi, b_hi])

        def sample(self, d: Any, noise: Any, s: Any, w: Any, real: Any = None) -> Any:
            """``(rint(clamp(D / den + k step)) * s) * w`` for the int32 tile products ``d`` and the
            odd noise integers ``noise`` (int32; unused unless noisy), counting the clipped
            samples (of the lanes set in ``real``, if given)."""
            b = self.b
            r = b.fdiv(b.sitofp(d, _F16), self.den)
            if self.noisy:
                r = b.fadd(r, b.fmul(b.sitofp(noise, _F16), self.step))
            # the clamp to [-ly, ly]: the smaller magnitude of (r, ly), with r's sign
            rc = b.call(self.vrange, [r, self.ly, ir.Constant(_I32, 2), r, ir.Constant(_I16, -1), ir.Constant(_I32, 4)])
            if self.count:  # |r| > ly: the clamp changed it
                over = b.fcmp_unordered("!=", rc, r)
                if real is not None:
                    over = b.and_(over, real)
                n_over = b.zext(b.call(self.ctpop, [b.bitcast(over, _I16)]), _I64)
                b.store(b.add(b.load(self.clipped), n_over), self.clipped)
            return b.fmul(b.fmul(b.call(self.rint, [rc]), s), w)

    def _make_stripe8(noisy: bool, count: bool) -> Any:
        """:func:`_stripe8` for one combination of the constant flags (one loop each)."""

        @intrinsic
        def stripe8(typingctx, codes, sx, hg, real, acc, wv, corr, sw, xbuf, kb, tstep, den, step, ly, n16):
            # pragma: no cover - compiled
            ok = (_is(codes, 2, types.int8) and _is(sx, 2, types.float32) and _is(hg, 1, types.uint64)
                  and _is(real, 1, types.uint8) and _is(acc, 2, types.float32) and _is(wv, 3, types.int32)
                  and _is(corr, 2, types.int32) and _is(sw, 2, types.float32) and _is(xbuf, 1, types.int32)
                  and kb == types.uint64 and tstep == types.uint64 and den == types.float32
                  and step == types.float32 and ly == types.float32 and isinstance(n16, types.Integer))
            if not ok:
                return None
            sig = types.int64(codes, sx, hg, real, acc, wv, corr, sw, xbuf, kb, tstep, den, step, ly, n16)

            def codegen(context, builder, signature, args):
                arrs = [context.make_array(signature.args[i])(context, builder, args[i]) for i in range(9)]
                a_codes, a_sx, a_hg, a_real, a_acc, a_wv, a_corr, a_sw, a_xbuf = arrs
                kb_v, tstep_v, den_v, step_v, ly_v = args[9:14]
                n16_v = context.cast(builder, args[14], signature.args[14], types.int64)
                cs0 = cgutils.unpack_tuple(builder, a_codes.strides, 2)[0]
                ss0 = cgutils.unpack_tuple(builder, a_sx.strides, 2)[0]
                acs0 = cgutils.unpack_tuple(builder, a_acc.strides, 2)[0]
                ws0, ws1, ws2 = cgutils.unpack_tuple(builder, a_wv.strides, 3)
                cr0, cr1 = cgutils.unpack_tuple(builder, a_corr.strides, 2)
                sw0, sw1 = cgutils.unpack_tuple(builder, a_sw.strides, 2)
                n_tiles, n_ch = cgutils.unpack_tuple(builder, a_corr.shape, 2)
                i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
                adc = _Adc(builder, den_v, step_v, ly_v, noisy, count)
                flip = ir.Constant(_W16, [0x80808080] * 16)
                zero_f = ir.Constant(_F16, [0.0] * 16)
                acc_slots = [cgutils.alloca_once(builder, _F16) for _ in range(4)]
                lo_mask = [j + 16 * r for j in range(16) for r in range(4)]  # lane j: rows 0..3 at position j
                cat32 = ir.Constant(ir.VectorType(_I32, 32), list(range(32)))  # two 16-byte rows, one after the other
                xb = builder.bitcast(a_xbuf.data, _W16.as_pointer())
                with cgutils.for_range(builder, n16_v) as blk:
                    v = builder.mul(blk.index, i64(16))
                    # this block's codes of every tile, interleaved: xbuf[2 t], xbuf[2 t + 1]
                    with cgutils.for_range(builder, n_tiles) as tl:
                        rows = []
                        for k in range(8):
                            off = builder.add(builder.mul(builder.add(builder.mul(tl.index, i64(8)), i64(k)), cs0), v)
                            rows.append(builder.load(_byte_ptr(builder, a_codes.data, off, _C16), align=1))
                        for h in range(2):
                            ab = builder.shuffle_vector(rows[4 * h], rows[4 * h + 1], cat32)
                            cd = builder.shuffle_vector(rows[4 * h + 2], rows[4 * h + 3], cat32)
                            both = builder.shuffle_vector(ab, cd, ir.Constant(ir.VectorType(_I32, 64), lo_mask))
                            word = builder.xor(builder.bitcast(both, _W16), flip)
                            dst = builder.gep(xb, [builder.add(builder.mul(tl.index, i64(2)), i64(h))])
                            builder.store(word, dst, align=4)
                    if noisy:
                        hgv = builder.load(_byte_ptr(builder, a_hg.data, builder.mul(v, i64(8)), _Q16), align=8)
                    if count:
                        rl = builder.load(_byte_ptr(builder, a_real.data, v, _C16), align=1)
                        realm = builder.icmp_unsigned("!=", rl, ir.Constant(_C16, [0] * 16))
                    with cgutils.for_range(builder, builder.udiv(n_ch, i64(4))) as qq:
                        for slot in acc_slots:
                            builder.store(zero_f, slot)
                        kbq = builder.add(kb_v, builder.mul(qq.index, ir.Constant(_I64, int(_GOLDEN))))
                        with cgutils.for_range(builder, n_tiles) as tl:
                            t = tl.index
                            xlo = builder.load(builder.gep(xb, [builder.mul(t, i64(2))]), align=4)
                            xhi = builder.load(builder.gep(xb, [builder.add(builder.mul(t, i64(2)), i64(1))]), align=4)
                            s_off = builder.add(builder.mul(t, ss0), builder.mul(v, i64(4)))
                            s = builder.load(_byte_ptr(builder, a_sx.data, s_off, _F16), align=4)
                            if noisy:  # splitmix64 of (kb + t tstep + q golden) + hg[v]
                                z = builder.add(_splat(builder, builder.add(kbq, builder.mul(t, tstep_v)), _Q16), hgv)
                                z = _splitmix(builder, z)
                                zz = builder.bitcast(z, ir.VectorType(_I32, 32))
                                undef32 = ir.Constant(ir.VectorType(_I32, 32), ir.Undefined)
                                lo = builder.shuffle_vector(zz, undef32, ir.Constant(_W16, list(range(0, 32, 2))))
                                hi = builder.shuffle_vector(zz, undef32, ir.Constant(_W16, list(range(1, 32, 2))))
                                sh16 = ir.Constant(_W16, [16] * 16)
                                # the odd 16-bit noise integers, signed: lanes (lo, lo >> 16, hi, hi >> 16)
                                lanes = [builder.or_(builder.ashr(v16, sh16), ir.Constant(_W16, [1] * 16))
                                         for v16 in (builder.shl(lo, sh16), lo, builder.shl(hi, sh16), hi)]
                            for lane in range(4):
                                o = builder.add(builder.mul(qq.index, i64(4)), i64(lane))
                                w_off = builder.add(builder.mul(t, ws0), builder.mul(o, ws1))
                                w_lo = builder.load(_byte_ptr(builder, a_wv.data, w_off, _I32), align=4)
                                w_hi = builder.load(_byte_ptr(builder, a_wv.data, builder.add(w_off, ws2), _I32),
                                                    align=4)
                                c_off = builder.add(builder.mul(t, cr0), builder.mul(o, cr1))
                                c = builder.load(_byte_ptr(builder, a_corr.data, c_off, _I32), align=4)
                                sw_off = builder.add(builder.mul(t, sw0), builder.mul(o, sw1))
                                w_s = builder.load(_byte_ptr(builder, a_sw.data, sw_off, _F), align=4)
                                d = adc.dot(_splat(builder, c, _W16), xlo, _splat(builder, w_lo, _W16), xhi,
                                            _splat(builder, w_hi, _W16))
                                y = adc.sample(d, lanes[lane] if noisy else None, s, _splat(builder, w_s, _F16),
                                               realm if count else None)
                                slot = acc_slots[lane]
                                builder.store(builder.fadd(builder.load(slot), y), slot)
                        for lane in range(4):
                            o = builder.add(builder.mul(qq.index, i64(4)), i64(lane))
                            off = builder.add(builder.mul(o, acs0), builder.mul(v, i64(4)))
                            builder.store(builder.load(acc_slots[lane]), _byte_ptr(builder, a_acc.data, off, _F16),
                                          align=4)
                return builder.load(adc.clipped)

            return sig, codegen

        return stripe8

    _stripe8 = {(nz, ct): _make_stripe8(nz, ct) for nz in (False, True) for ct in (False, True)}
    _s_ff, _s_ft, _s_tf, _s_tt = (_stripe8[k] for k in ((False, False), (False, True), (True, False), (True, True)))

    #: rows of :func:`_rows8` that share each load of the weight words (their sums: 2 R registers)
    ROWS_PER_GROUP = 4

    def _make_rows8(noisy: bool, count: bool) -> Any:
        """:func:`_rows8` for one combination of the constant flags."""

        @intrinsic
        def rows8(typingctx, xw, corr, sx, wv, sw, y, key, a0, m_total, jb, den, step, ly):
            # pragma: no cover - compiled
            ok = (_is(xw, 2, types.int32) and _is(corr, 2, types.int32) and _is(sx, 2, types.float32)
                  and _is(wv, 3, types.int32) and _is(sw, 2, types.float32) and _is(y, 2, types.float32)
                  and key == types.uint64 and all(isinstance(v, types.Integer) for v in (a0, m_total, jb))
                  and den == types.float32 and step == types.float32 and ly == types.float32)
            if not ok:
                return None
            sig = types.int64(xw, corr, sx, wv, sw, y, key, a0, m_total, jb, den, step, ly)

            def codegen(context, builder, signature, args):
                a_xw, a_corr, a_sx, a_wv, a_sw, a_y = [context.make_array(signature.args[i])(context, builder, args[i])
                                                       for i in range(6)]
                key_v = args[6]
                a0_v, m_tot, jb_v = [context.cast(builder, args[i], signature.args[i], types.int64) for i in (7, 8, 9)]
                adc = _Adc(builder, args[10], args[11], args[12], noisy, count)
                i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
                xs0, xs1 = cgutils.unpack_tuple(builder, a_xw.strides, 2)
                cr0, cr1 = cgutils.unpack_tuple(builder, a_corr.strides, 2)
                ss0, ss1 = cgutils.unpack_tuple(builder, a_sx.strides, 2)
                ws0, ws1, ws2 = cgutils.unpack_tuple(builder, a_wv.strides, 3)
                sws0, sws1 = cgutils.unpack_tuple(builder, a_sw.strides, 2)
                ys0, ys1 = cgutils.unpack_tuple(builder, a_y.strides, 2)
                n_tiles = cgutils.unpack_tuple(builder, a_wv.shape, 3)[0]
                m_rows, n_cols = cgutils.unpack_tuple(builder, a_y.shape, 2)
                rem = builder.sub(n_cols, jb_v)  # columns of this block (32 unless the last, partial one)
                full = builder.icmp_signed(">=", rem, i64(32))
                if count:  # the lanes of real columns
                    rem_s = _splat(builder, builder.trunc(rem, _I32), _W16)
                    real = [builder.icmp_signed("<", ir.Constant(_W16, list(range(16 * q, 16 * q + 16))), rem_s)
                            for q in range(2)]
                i16x32 = ir.VectorType(_I16, 32)
                perm = _declare(builder.module, "llvm.x86.avx512.vpermi2var.hi.512",
                                ir.FunctionType(i16x32, [i16x32, i16x32, i16x32]))
                part = cgutils.alloca_once(builder, _F16, size=2)  # a partial block's sums, for the copy
                golden8 = ir.Constant(ir.VectorType(_I64, 8), [(i * int(_GOLDEN)) % 2**64 for i in range(8)])
                zero_f = ir.Constant(_F16, [0.0] * 16)
                slots = [cgutils.alloca_once(builder, _F16) for _ in range(2 * ROWS_PER_GROUP)]

                def at(arr, off0, off1, ty):
                    return _byte_ptr(builder, arr.data, off0, ty) if off1 is None else \
                        _byte_ptr(builder, arr.data, builder.add(off0, off1), ty)

                def emit(r0, R):
                    """Rows ``r0 .. r0 + R - 1``, columns ``jb .. jb + 31``, every tile."""
                    rows = [builder.add(r0, i64(i)) for i in range(R)]
                    for sl in slots[: 2 * R]:
                        builder.store(zero_f, sl)
                    with cgutils.for_range(builder, n_tiles) as tl:
                        t = tl.index
                        wrow = builder.mul(t, ws0)
                        jbo = builder.mul(jb_v, ws2)
                        wl = [builder.load(at(a_wv, builder.add(wrow, builder.mul(h, ws1)),
                                              builder.add(jbo, i64(64 * q)), _W16), align=4)
                              for h in (i64(0), i64(1)) for q in range(2)]  # (lo, cols 0-15), (lo, 16-31), (hi, ..)
                        swo = builder.add(builder.mul(t, sws0), builder.mul(jb_v, sws1))
                        wsc = [builder.load(at(a_sw, swo, i64(64 * q), _F16), align=4) for q in range(2)]
                        for i, r in enumerate(rows):
                            xo = builder.add(builder.mul(r, xs0), builder.mul(builder.mul(t, i64(2)), xs1))
                            x_lo = _splat(builder, builder.load(at(a_xw, xo, None, _I32), align=4), _W16)
                            x_hi = _splat(builder, builder.load(at(a_xw, xo, xs1, _I32), align=4), _W16)
                            c = _splat(builder, builder.load(at(a_corr, builder.mul(r, cr0), builder.mul(t, cr1), _I32),
                                                             align=4), _W16)
                            sc = _splat(builder, builder.load(at(a_sx, builder.mul(r, ss0), builder.mul(t, ss1), _F),
                                                              align=4), _F16)
                            noise = [None, None]
                            if noisy:  # the 32 samples' noise: 16-bit lanes of splitmix64 outputs, in order
                                base = builder.add(builder.mul(builder.add(builder.add(a0_v, builder.mul(t, m_tot)), r),
                                                               n_cols), jb_v)  # the first sample's noise index
                                golden = ir.Constant(_I64, int(_GOLDEN))
                                z0 = builder.add(key_v, builder.mul(builder.add(builder.lshr(base, i64(2)), i64(1)),
                                                                    golden))
                                za = _splitmix(builder, builder.add(_splat(builder, z0, ir.VectorType(_I64, 8)), golden8))  # lanes 0 .. 31
                                zb = _splitmix(builder, builder.add(z0, builder.mul(i64(8), golden)))  # 32 .. 35
                                zb = builder.insert_element(ir.Constant(ir.VectorType(_I64, 8), [0] * 8), zb,
                                                            ir.Constant(_I32, 0))
                                off = builder.trunc(builder.and_(base, i64(3)), _I16)  # the first sample's lane
                                idx = builder.add(_splat(builder, off, i16x32), ir.Constant(i16x32, list(range(32))))
                                h16 = builder.call(perm, [builder.bitcast(za, i16x32), idx, builder.bitcast(zb, i16x32)])
                                h16 = builder.or_(h16, ir.Constant(i16x32, [1] * 32))
                                e = builder.sext(h16, ir.VectorType(_I32, 32))
                                undef = ir.Constant(ir.VectorType(_I32, 32), ir.Undefined)
                                halves = (ir.Constant(_W16, list(range(16 * q, 16 * q + 16))) for q in range(2))
                                noise = [builder.shuffle_vector(e, undef, hq) for hq in halves]  # columns 0-15, 16-31
                            for q in range(2):
                                d = adc.dot(c, wl[q], x_lo, wl[2 + q], x_hi)
                                sl = slots[2 * i + q]
                                y = adc.sample(d, noise[q], sc, wsc[q], real[q] if count else None)
                                builder.store(builder.fadd(builder.load(sl), y), sl)
                    for i, r in enumerate(rows):
                        yo = builder.add(builder.mul(r, ys0), builder.mul(jb_v, ys1))
                        with builder.if_else(full) as (whole, partial):
                            with whole:
                                for q in range(2):
                                    builder.store(builder.load(slots[2 * i + q]), at(a_y, yo, i64(64 * q), _F16),
                                                  align=4)
                            with partial:  # the block's first rem columns, one at a time
                                for q in range(2):
                                    builder.store(builder.load(slots[2 * i + q]), builder.gep(part, [i64(q)]))
                                flat = builder.bitcast(part, _F.as_pointer())
                                with cgutils.for_range(builder, rem) as col:
                                    v = builder.load(builder.gep(flat, [col.index]))
                                    builder.store(v, at(a_y, yo, builder.mul(col.index, ys1), _F))

                groups = builder.udiv(m_rows, i64(ROWS_PER_GROUP))
                with cgutils.for_range(builder, groups) as rg:
                    emit(builder.mul(rg.index, i64(ROWS_PER_GROUP)), ROWS_PER_GROUP)
                done = builder.mul(groups, i64(ROWS_PER_GROUP))
                with cgutils.for_range(builder, builder.sub(m_rows, done)) as rr:
                    emit(builder.add(done, rr.index), 1)
                return builder.load(adc.clipped)

            return sig, codegen

        return rows8

    _rows8 = {(nz, ct): _make_rows8(nz, ct) for nz in (False, True) for ct in (False, True)}
    _r_ff, _r_ft, _r_tf, _r_tt = (_rows8[k] for k in ((False, False), (False, True), (True, False), (True, True)))

    _jit: Any = dict(cache=True, nogil=True, error_model="numpy")

    @njit(parallel=True, **_jit)
    def _narrow_cols8_vnni(codes, wv, corr, den, noise_step, ly, key, noisy, count, sx, sw, y, virtual_w, real_pos,
                           p_total, p_off, stripe):
        """:func:`.fused.narrow_cols8` on int8 patch codes ``codes`` (G, 8 T, >= positions + 15) and
        packed weights ``wv`` (G, T, Ng, 2), ``corr`` (G, T, Ng) (:func:`pack_weights`); ``den`` the
        divisor of :meth:`~.adc.AdcPlan.int_ratio`; ``sx`` (T, G, positions), read up to 15 values
        past each row's end. Same work items, noise indices, sums and clipped count."""
        G, T, Ng, _ = wv.shape
        bc, _, out_h, wo = y.shape
        lb = out_h * virtual_w
        ns = (bc * lb + stripe - 1) // stripe
        clipped = 0
        for item in prange(G * ns):
            g = item // ns
            p0 = (item % ns) * stripe
            p1 = min(bc * lb, p0 + stripe)
            n16 = (p1 - p0 + 15) // 16
            acc = np.empty((Ng, 16 * n16), np.float32)
            hg = np.zeros(16 * n16, np.uint64)
            real = np.zeros(16 * n16, np.uint8)
            xb = np.empty(32 * T, np.int32)
            stripe_positions(p0, p1, lb, out_h, wo, Ng, real_pos, hg, real)
            # the hash counter of tile t, channels 4q..4q+3: (base + 4 q) / 4 + 1, base = ((g T + t) p_total + p_off) Ng
            kb = key + np.uint64((((g * T * p_total + p_off) * Ng) >> 2) + 1) * _GOLDEN
            tstep = np.uint64((p_total * Ng) >> 2) * _GOLDEN
            cg = codes[g, :, p0:]
            xs = sx[:, g, p0:]
            if noisy and count:
                clipped += _s_tt(cg, xs, hg, real, acc, wv[g], corr[g], sw[g], xb, kb, tstep, den, noise_step, ly, n16)
            elif noisy:
                _s_tf(cg, xs, hg, real, acc, wv[g], corr[g], sw[g], xb, kb, tstep, den, noise_step, ly, n16)
            elif count:
                clipped += _s_ft(cg, xs, hg, real, acc, wv[g], corr[g], sw[g], xb, kb, tstep, den, noise_step, ly, n16)
            else:
                _s_ff(cg, xs, hg, real, acc, wv[g], corr[g], sw[g], xb, kb, tstep, den, noise_step, ly, n16)
            stripe_out(acc, y, g, p0, p1, lb, virtual_w)
        return clipped

    @njit(parallel=True, **_jit)
    def _narrow_rows8_vnni(x, xw, sx, wv, sw, den, noise_step, ly, key, noisy, count, y, b_off, M, m_off):
        """:func:`.fused.narrow_rows` for tiles of width 8: ``x`` (b, m, 8 T) int8 input codes and
        ``xw`` the same memory as (b, m, 2 T) int32 words; ``sx`` (b, m, T); ``wv`` (Bw, T, 2, Np) the
        weight words and ``sw`` (Bw, T, Np) the scales of :func:`pack_rows` (Bw = 1: shared; ``Np``
        the ``N`` columns of ``y`` (b, m, N) padded to a multiple of 32); ``den``
        :meth:`~.adc.AdcPlan.int_ratio`'s divisor. A work item is a block of 32 columns of one
        batch: for every row (:data:`ROWS_PER_GROUP` at a time), the tile sums stay in registers
        over ``t = 0, 1, ...``; the noise of the block's samples is read from the 16-bit lanes of
        nine splitmix64 outputs at the lane of the first one (any ``N``). Same numbers and
        clipped count."""
        b, m, _ = x.shape
        T, N = wv.shape[1], y.shape[2]
        shared = wv.shape[0] == 1
        corr = np.empty((b, m, T), np.int32)  # -128 sum of each tile's codes: the weights' offset taken out
        for br in prange(b * m):
            xr = x[br // m, br % m]
            cr = corr[br // m, br % m]
            for t in range(T):
                acc = np.int32(0)
                for k in range(8):
                    acc += np.int32(xr[8 * t + k])
                cr[t] = np.int32(-128) * acc
        nc = (N + 31) // 32
        clipped = 0
        for item in prange(b * nc):
            ib = item // nc
            jb = (item % nc) * 32
            wb = 0 if shared else b_off + ib
            a0 = ((b_off + ib) * T) * M + m_off
            if noisy and count:
                clipped += _r_tt(xw[ib], corr[ib], sx[ib], wv[wb], sw[wb], y[ib], key, a0, M, jb, den, noise_step, ly)
            elif noisy:
                _r_tf(xw[ib], corr[ib], sx[ib], wv[wb], sw[wb], y[ib], key, a0, M, jb, den, noise_step, ly)
            elif count:
                clipped += _r_ft(xw[ib], corr[ib], sx[ib], wv[wb], sw[wb], y[ib], key, a0, M, jb, den, noise_step, ly)
            else:
                _r_ff(xw[ib], corr[ib], sx[ib], wv[wb], sw[wb], y[ib], key, a0, M, jb, den, noise_step, ly)
        return clipped

    narrow_cols8_vnni = _narrow_cols8_vnni
    narrow_rows8_vnni = _narrow_rows8_vnni
