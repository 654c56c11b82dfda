"""The DNF sampler's inner loop sixteen elements at a time, the alias table held in AVX-512 registers.

On a CPU with AVX-512 the two 32-bit hashes of :mod:`.hash32` run sixteen lanes per
instruction, but the table look-up stays the bottleneck: numba's loops keep it scalar, and a
gather (:mod:`.avx2_lookup`, or its 16-lane AVX-512 form) loads every element's entry from
memory (about 0.5 ns per element on an AMD Zen 4 core). A table of at most :data:`MAX_SLOTS`
(128) packed 32-bit words fits in eight 512-bit registers; :func:`noise16` loads it once per
block and looks up sixteen slots with four two-source permutes (``vpermi2d``: 32 entries
each, by the low five bits of the slot) and three selects (by bits 5 and 6). The whole loop
body is written as LLVM vector instructions, one pass over the block, no scratch arrays, for
elements ``j = 0 .. 16 n16 - 1`` of the block ``y`` (the formula of :mod:`.sampler`,
arithmetic modulo 2^32):

    x = x0 + j,   u = h(x * MUL_U + k1),   r = h(x * MUL_R + k2)
    s = u >> (32 - b),   e = tab[s],   bin = s if (u mod 2^(32-b)) < (e >> b) else e mod 2^b
    y[j] = y[j] + (l0 + w0 * (float32(bin) + float32(r >> 8) * 2^-24))

in float32 in exactly this order (no fused multiply-add), so it gives the scalar loop's bits
(tested). ``tab`` is one row of the packed alias table padded with zeros to 128 entries
(slots ``>= 2^b`` are never looked up). :data:`USABLE` says whether this process may use it:
numba present and compiling for this machine's CPU (``NUMBA_CPU_NAME`` unset), and that CPU
has AVX-512F; elsewhere :mod:`.alias_kernel` runs its other loops.

Two rewrites keep the bits and save instructions (0.57 -> 0.48 ns per element on a 200k-element
output in L2, Zen 4): ``x * MUL + k`` is kept per lane and stepped by ``16 MUL`` per pass (two
32-bit multiplies fewer), and ``float32(bin) + float32(r >> 8) 2^-24`` is computed as
``float32(bin 2^24 + (r >> 8)) 2^-24``: both round the same exact value ``bin + (r >> 8) 2^-24``
once to nearest even, since ``bin < 2^7`` keeps the integer below ``2^31`` and the power-of-two
scale is exact. numba's cache does not see this file: a change here must also change
:mod:`.alias_kernel` (its doc).
"""

from __future__ import annotations

from typing import Any

from ..numerics import fused

__all__ = ["MAX_BITS", "MAX_SLOTS", "USABLE", "noise16"]

#: slot bits (and slots) the register-held table covers: 8 registers of 16 words
MAX_BITS = 7
MAX_SLOTS = 1 << MAX_BITS


#: the 16-lane loop may run in this process
USABLE = fused.host_cpu_has("avx512f")

noise16: Any = None

if USABLE:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .hash32 import H1, H2, MUL_R, MUL_U

    _I32 = ir.IntType(32)
    _V16 = ir.VectorType(_I32, 16)
    _F16 = ir.VectorType(ir.FloatType(), 16)
    _PERMUTE = "llvm.x86.avx512.vpermi2var.d.512"  # (table a, index, table b): 32 entries

    def _const(v: int) -> Any:
        return ir.Constant(_V16, [v & 0xFFFFFFFF] * 16)

    def _splat(builder: Any, x: Any, vec: Any = _V16) -> Any:
        one = builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), ir.Constant(_V16, [0] * 16))

    def _hash(builder: Any, v: Any) -> Any:
        """``h`` of :mod:`.hash32` on sixteen lanes."""
        v = builder.xor(v, builder.lshr(v, _const(16)))
        v = builder.mul(v, _const(H1))
        v = builder.xor(v, builder.lshr(v, _const(15)))
        v = builder.mul(v, _const(H2))
        return builder.xor(v, builder.lshr(v, _const(16)))

    def _declare(module: Any, name: str, fnty: Any) -> Any:
        fn = module.globals.get(name)
        return fn if fn is not None else ir.Function(module, fnty, name=name)

    @intrinsic
    def noise16(typingctx, y, n16, x0, k1, k2, tab, b, l0, w0):  # pragma: no cover - compiled
        """``y[j] += xi_j`` for ``j < 16 n16`` (module doc). ``y``: 1-D float32 array whose
        elements are adjacent (a slice of the flat output); ``tab``: 1-D uint32, at least 128
        entries; ``x0``, ``k1``, ``k2``: uint32; ``l0``, ``w0``: float32; ``b <= 7``."""
        if not (isinstance(y, types.Array) and isinstance(tab, types.Array) and y.ndim == 1 and tab.ndim == 1):
            return None
        if y.dtype != types.float32 or tab.dtype != types.uint32:
            return None
        if x0 != types.uint32 or k1 != types.uint32 or k2 != types.uint32 or l0 != types.float32 or w0 != types.float32:
            return None

        def codegen(context, builder, signature, args):
            y_v, n_v, x0_v, k1_v, k2_v, tab_v, b_v, l0_v, w0_v = args
            y_a = context.make_array(signature.args[0])(context, builder, y_v)
            t_a = context.make_array(signature.args[5])(context, builder, tab_v)
            b32 = builder.trunc(b_v, _I32)
            bits = _splat(builder, b32)
            shift = _splat(builder, builder.sub(ir.Constant(_I32, 32), b32))
            one = _const(1)
            fmask = builder.sub(builder.shl(one, shift), one)
            smask = builder.sub(builder.shl(one, bits), one)
            k1s, k2s = _splat(builder, k1_v), _splat(builder, k2_v)
            l0s, w0s = _splat(builder, l0_v, _F16), _splat(builder, w0_v, _F16)
            lanes = ir.Constant(_V16, list(range(16)))
            tp = builder.bitcast(t_a.data, _V16.as_pointer())
            table = [builder.load(builder.gep(tp, [ir.Constant(_I32, q)]), align=4) for q in range(8)]
            permute = _declare(builder.module, _PERMUTE, ir.FunctionType(_V16, [_V16, _V16, _V16]))
            bit5, bit6, zero = _const(32), _const(64), _const(0)
            scale = ir.Constant(_F16, [2.0**-24] * 16)
            # x * MUL + k of the loop's first sixteen lanes, then 16 MUL more per pass (modulo 2^32)
            x = builder.add(_splat(builder, x0_v), lanes)
            pre_u = cgutils.alloca_once_value(builder, builder.add(builder.mul(x, _const(MUL_U)), k1s))
            pre_r = cgutils.alloca_once_value(builder, builder.add(builder.mul(x, _const(MUL_R)), k2s))
            with cgutils.for_range(builder, n_v) as loop:
                first = builder.mul(loop.index, ir.Constant(loop.index.type, 16))
                xu, xr = builder.load(pre_u), builder.load(pre_r)
                builder.store(builder.add(xu, _const(16 * MUL_U)), pre_u)
                builder.store(builder.add(xr, _const(16 * MUL_R)), pre_r)
                u = _hash(builder, xu)
                slot = builder.lshr(u, shift)
                quarter = [builder.call(permute, [table[2 * q], slot, table[2 * q + 1]]) for q in range(4)]
                hi5 = builder.icmp_unsigned("!=", builder.and_(slot, bit5), zero)
                hi6 = builder.icmp_unsigned("!=", builder.and_(slot, bit6), zero)
                e = builder.select(hi6, builder.select(hi5, quarter[3], quarter[2]),
                                   builder.select(hi5, quarter[1], quarter[0]))
                keep = builder.icmp_unsigned("<", builder.and_(u, fmask), builder.lshr(e, bits))
                k = builder.select(keep, slot, builder.and_(e, smask))
                r = _hash(builder, xr)
                # float32(k) + float32(r >> 8) 2^-24 (one rounding) as float32(k 2^24 + (r >> 8)) 2^-24:
                # the same rounding of the same exact value (k < 128: the integer stays below 2^31)
                pos = builder.or_(builder.shl(k, _const(24)), builder.lshr(r, _const(8)))
                pos = builder.fmul(builder.sitofp(pos, _F16), scale)
                xi = builder.fadd(l0s, builder.fmul(w0s, pos))
                ptr = builder.bitcast(builder.gep(y_a.data, [first]), _F16.as_pointer())
                builder.store(builder.fadd(builder.load(ptr, align=4), xi), ptr, align=4)
            return context.get_dummy_value()

        return types.void(y, n16, x0, k1, k2, tab, b, l0, w0), codegen
