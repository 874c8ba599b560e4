"""SIMD vectors and the x86 table-lookup instruction for Numba kernels, through LLVM intrinsics.

Numba has no vector types, so this module adds two (16 and 8 float32 lanes, held in LLVM vector registers) and
the few operations the lookup kernels need. `ops(lanes)` returns them as a namespace; kernels are written once
against that namespace (see _kernels.py).

The lookup: for a group of 4 activations, the 16 signed sums ``sum_b (+/-) a_b`` form a 16-entry float32 table
indexed by the 4 sign bits of a weight row. ``vpermps`` looks up one entry per lane, so with one row per lane a
single instruction applies 4 weights to 16 rows (AVX-512) at once. AVX2's ``vpermps`` has 8 lanes and 3-bit
indices: it looks up both halves of the table and selects by bit 3.

Only call these on a CPU that has the instructions (see `mosbits.backends.numba.isa`): LLVM emits them as asked.
"""

from __future__ import annotations

import functools
import types as pytypes

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I8 = ir.IntType(8)


class FloatVector(types.Type):
    """A vector of ``lanes`` float32 in one register."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        super().__init__(name=f"FloatVector{lanes}")


class CodeVector(types.Type):
    """A vector of ``lanes`` int32 lookup indices (only the low 4 bits are used)."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        super().__init__(name=f"CodeVector{lanes}")


@register_model(FloatVector)
class _FloatVectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_F32, fe_type.lanes))


@register_model(CodeVector)
class _CodeVectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_I32, fe_type.lanes))


def _element_pointer(context, builder, array_type, array, index):
    """Pointer to ``array[index]`` of a contiguous 1-D array."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


def _vector_pointer(context, builder, array_type, array, index, vector):
    return builder.bitcast(_element_pointer(context, builder, array_type, array, index), vector.as_pointer())


def _avx512_lookup(builder, table_lo, table_hi, codes):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(table_lo.type, [table_lo.type, codes.type]), "llvm.x86.avx512.permvar.sf.512")
    return builder.call(fn, [table_lo, codes])


def _avx2_lookup(builder, table_lo, table_hi, codes):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(table_lo.type, [table_lo.type, codes.type]), "llvm.x86.avx2.permps")
    lanes = codes.type.count
    upper = builder.icmp_unsigned("!=", builder.and_(codes, ir.Constant(codes.type, [8] * lanes)),
                                  ir.Constant(codes.type, [0] * lanes))
    return builder.select(upper, builder.call(fn, [table_hi, codes]), builder.call(fn, [table_lo, codes]))


@functools.cache
def ops(lanes: int) -> pytypes.SimpleNamespace:
    """The vector operations for ``lanes`` = 16 (AVX-512) or 8 (AVX2).

    Returns a namespace with:
        zeros() -> FloatVector
        load_codes(u8 array, offset) -> CodeVector: ``lanes`` bytes from ``array[offset:]``, zero-extended
        high_nibbles(codes) -> CodeVector: codes >> 4
        lookup_add(acc, f32 array, offset, codes) -> acc + table[codes], the 16-entry table at array[offset:]
        add(a, b) -> a + b
        load(f32 array, offset) -> FloatVector: array[offset:offset + lanes]
        store(f32 array, offset, vector): array[offset:offset + lanes] = vector
    """
    if lanes not in (8, 16):
        raise ValueError(f"lanes must be 8 (AVX2) or 16 (AVX-512), got {lanes}")
    float_type, code_type = FloatVector(lanes), CodeVector(lanes)
    vf, vi, vb = ir.VectorType(_F32, lanes), ir.VectorType(_I32, lanes), ir.VectorType(_I8, lanes)
    lookup = _avx512_lookup if lanes == 16 else _avx2_lookup

    @intrinsic
    def zeros(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(vf, [0.0] * lanes)

        return float_type(), codegen

    @intrinsic
    def load_codes(typingctx, array, offset):
        def codegen(context, builder, sig, args):
            pointer = _vector_pointer(context, builder, sig.args[0], args[0], args[1], vb)
            return builder.zext(builder.load(pointer, align=1), vi)

        return code_type(array, offset), codegen

    @intrinsic
    def high_nibbles(typingctx, codes):
        def codegen(context, builder, sig, args):
            return builder.lshr(args[0], ir.Constant(vi, [4] * lanes))

        return code_type(codes), codegen

    @intrinsic
    def lookup_add(typingctx, acc, tables, offset, codes):
        def codegen(context, builder, sig, args):
            acc, tables, offset, codes = args
            lo = builder.load(_vector_pointer(context, builder, sig.args[1], tables, offset, vf), align=4)
            hi = None
            if lanes == 8:
                upper = builder.add(offset, ir.Constant(offset.type, 8))
                hi = builder.load(_vector_pointer(context, builder, sig.args[1], tables, upper, vf), align=4)
            return builder.fadd(acc, lookup(builder, lo, hi, codes))

        return float_type(acc, tables, offset, codes), codegen

    @intrinsic
    def add(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return builder.fadd(args[0], args[1])

        return float_type(a, b), codegen

    @intrinsic
    def load(typingctx, array, offset):
        def codegen(context, builder, sig, args):
            return builder.load(_vector_pointer(context, builder, sig.args[0], args[0], args[1], vf), align=4)

        return float_type(array, offset), codegen

    @intrinsic
    def store(typingctx, array, offset, vector):
        def codegen(context, builder, sig, args):
            builder.store(args[2], _vector_pointer(context, builder, sig.args[0], args[0], args[1], vf), align=4)
            return context.get_dummy_value()

        return types.void(array, offset, vector), codegen

    return pytypes.SimpleNamespace(lanes=lanes, zeros=zeros, load_codes=load_codes, high_nibbles=high_nibbles,
                                   lookup_add=lookup_add, add=add, load=load, store=store)
