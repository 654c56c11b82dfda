"""Eight alias-table look-ups of the DNF sampler at once, with the AVX2 gather instruction.

numba's LLVM does not vectorise the sampler's table look-up (LLVM considers gathers slow
on most CPUs before AVX-512 and keeps the loop scalar: about 0.8 ns per element on a Zen 3
core). :func:`lookup8` writes the eight look-ups as LLVM vector instructions around
``llvm.x86.avx2.gather.d.d.256`` (one ``vpgatherdd``), for elements ``j .. j + 7`` of a
block (:mod:`.alias_kernel`, the formula of :mod:`.sampler`):

    s = u[j] >> (32 - b),   e = tab[s],
    kb[j] = float32(s if (u[j] mod 2^(32-b)) < (e >> b) else e mod 2^b)

exactly what the scalar loop computes (tested equal). :data:`USABLE` says whether this
process may use it: numba present and compiling for this machine's CPU (``NUMBA_CPU_NAME``
unset), and that CPU has AVX2; elsewhere the scalar loop runs.
"""

from __future__ import annotations

from typing import Any

from ..numerics import fused

__all__ = ["USABLE", "lookup8"]


#: the gather path may run in this process
USABLE = fused.host_cpu_has("avx2")

lookup8: Any = None

if USABLE:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    _I32 = ir.IntType(32)
    _V8 = ir.VectorType(_I32, 8)
    _F8 = ir.VectorType(ir.FloatType(), 8)
    _P8 = ir.IntType(8).as_pointer()
    _GATHER = "llvm.x86.avx2.gather.d.d.256"

    def _splat(builder: Any, x: Any) -> Any:
        vec = ir.Constant(_V8, ir.Undefined)
        for lane in range(8):
            vec = builder.insert_element(vec, x, ir.Constant(_I32, lane))
        return vec

    @intrinsic
    def lookup8(typingctx, tab, u, kb, j, b):  # pragma: no cover - compiled
        """``kb[j .. j+7]`` from ``u[j .. j+7]`` and the packed table ``tab`` (uint32, 2^b
        entries), ``b`` slot bits (module doc). ``tab``, ``u``, ``kb``: 1-D contiguous arrays."""
        if not (isinstance(tab, types.Array) and isinstance(u, types.Array) and isinstance(kb, types.Array)):
            return None
        if tab.dtype != types.uint32 or u.dtype != types.uint32 or kb.dtype != types.float32:
            return None

        def codegen(context, builder, signature, args):
            tab_v, u_v, kb_v, j_v, b_v = args
            tab_a = context.make_array(signature.args[0])(context, builder, tab_v)
            u_a = context.make_array(signature.args[1])(context, builder, u_v)
            kb_a = context.make_array(signature.args[2])(context, builder, kb_v)
            words = builder.load(builder.bitcast(builder.gep(u_a.data, [j_v]), _V8.as_pointer()), align=4)
            b32 = builder.trunc(b_v, _I32)
            bits = _splat(builder, b32)
            shift = _splat(builder, builder.sub(ir.Constant(_I32, 32), b32))
            one = _splat(builder, ir.Constant(_I32, 1))
            slot = builder.lshr(words, shift)
            fmask = builder.sub(builder.shl(one, shift), one)
            smask = builder.sub(builder.shl(one, bits), one)
            fn = builder.module.globals.get(_GATHER)
            if fn is None:
                fn = ir.Function(builder.module, ir.FunctionType(_V8, [_V8, _P8, _V8, _V8, ir.IntType(8)]), name=_GATHER)
            entry = builder.call(fn, [ir.Constant(_V8, [0] * 8), builder.bitcast(tab_a.data, _P8), slot,
                                      ir.Constant(_V8, [-1] * 8), ir.Constant(ir.IntType(8), 4)])
            keep = builder.icmp_unsigned("<", builder.and_(words, fmask), builder.lshr(entry, bits))
            k = builder.select(keep, slot, builder.and_(entry, smask))
            out = builder.bitcast(builder.gep(kb_a.data, [j_v]), _F8.as_pointer())
            builder.store(builder.sitofp(k, _F8), out, align=4)
            return context.get_dummy_value()

        return types.void(tab, u, kb, j, b), codegen
