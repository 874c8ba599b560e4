"""SIMD vectors and the x86 table-lookup instruction for Numba kernels, through LLVM intrinsics.

Numba has no vector types, so this module adds them (16 and 8 float32 lanes, 64 and 32 int16 lanes, held in
LLVM vector registers) and the few operations the lookup kernels need. `ops(lanes)` and `byte_ops(lanes)`
return them as a namespace module; kernels are written once against that namespace (see _kernels.py).

The lookup: for a group of 4 activations, the 16 signed sums ``sum_b (+/-) a_b`` form a 16-entry float32 table
indexed by the 4 sign bits of a weight row. ``vpermps`` looks up one entry per lane, so with one row per lane a
single instruction applies 4 weights to 16 rows (AVX-512) at once. AVX2's ``vpermps`` has 8 lanes and 3-bit
indices: it looks up both halves of the table and selects by bit 3.

Only call these on a CPU that has the instructions (see `mosbits.backends.numba.host_isas`): LLVM emits them as
asked. Numba's disk cache of the kernels checks only _kernels.py for changes: after editing this module, delete
backends/numba/__pycache__/*.nbi (or touch _kernels.py) so that cached kernels are rebuilt.
"""

from __future__ import annotations

import functools
import types as pytypes

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I16 = ir.IntType(16)
_I8 = ir.IntType(8)


class FloatVector(types.Type):
    """A vector of ``lanes`` float32 in one register."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        super().__init__(name=f"FloatVector{lanes}")


class ShortVector(types.Type):
    """A vector of ``lanes`` int16 accumulators (the int8 lookups of the fast mode)."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        super().__init__(name=f"ShortVector{lanes}")


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


@register_model(ShortVector)
class _ShortVectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_I16, fe_type.lanes))


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


def _namespace(name: str, **members: object) -> pytypes.ModuleType:
    """A module object holding ``members``: kernels reach them as ``ops.zeros()``, which Numba resolves at
    compile time for module attributes (not for other namespace objects)."""
    module = pytypes.ModuleType(f"{__name__}.{name}")
    module.__dict__.update(members)
    return module


@functools.cache
def ops(lanes: int) -> pytypes.ModuleType:
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

    return _namespace(f"ops{lanes}", lanes=lanes, zeros=zeros, load_codes=load_codes, high_nibbles=high_nibbles,
                                   lookup_add=lookup_add, add=add, load=load, store=store)


SHUFFLE_INTRINSICS = {64: "llvm.x86.avx512.pshuf.b.512", 32: "llvm.x86.avx2.pshuf.b"}
"""``pshufb``: per 16-byte lane, byte i of the result is byte ``index[i] & 15`` of the table (0 if bit 7 is set)."""


@functools.cache
def byte_ops(lanes: int) -> pytypes.ModuleType:
    """The int8 table-lookup operations of the fast mode, for ``lanes`` = 64 (AVX-512BW) or 32 (AVX2) rows.

    One ``pshufb`` looks up a 16-entry int8 table (the quantised signed sums of 4 inputs) with the 4-bit code
    of one row per byte: 4 weights for ``lanes`` rows per instruction.

    Returns a namespace with:
        zeros() -> ShortVector
        lookup_add(acc, i8 array, offset, u8 array, code_offset) -> ShortVector: ``lanes`` code bytes at
            ``codes[code_offset:]``; their low nibbles index the table at ``tables[offset:offset + 16]``, their
            high nibbles the table at ``tables[offset + 16:offset + 32]``; both lookups are sign-extended and
            added to ``acc``.
        float_zeros() -> FloatVector of ``lanes`` float32
        scaled_add(total, acc, scale) -> FloatVector: total + float(acc) * scale
        store_sum(f32 array, offset, total, accumulate) -> None:
            ``out[offset:offset + lanes] = (out[...] if accumulate else 0) + total``
    """
    if lanes not in SHUFFLE_INTRINSICS:
        raise ValueError(f"lanes must be 64 (AVX-512) or 32 (AVX2), got {lanes}")
    short_type, float_type = ShortVector(lanes), FloatVector(lanes)
    vb, vs, vf = ir.VectorType(_I8, lanes), ir.VectorType(_I16, lanes), ir.VectorType(_F32, lanes)
    table_type = ir.VectorType(_I8, 16)
    broadcast = ir.Constant(ir.VectorType(_I32, lanes), [i % 16 for i in range(lanes)])

    def shuffle(builder, table, index):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vb, [vb, vb]), SHUFFLE_INTRINSICS[lanes])
        return builder.call(fn, [table, index])

    @intrinsic
    def zeros(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(vs, [0] * lanes)

        return short_type(), codegen

    @intrinsic
    def lookup_add(typingctx, acc, tables, offset, codes, code_offset):
        def codegen(context, builder, sig, args):
            acc, tables, offset, codes, code_offset = args
            code = builder.load(_vector_pointer(context, builder, sig.args[3], codes, code_offset, vb), align=1)
            low = builder.and_(code, ir.Constant(vb, [15] * lanes))
            high = builder.lshr(code, ir.Constant(vb, [4] * lanes))
            total = acc
            for index, start in ((low, offset), (high, builder.add(offset, ir.Constant(offset.type, 16)))):
                pointer = _vector_pointer(context, builder, sig.args[1], tables, start, table_type)
                table = builder.load(pointer, align=1)
                wide = builder.shuffle_vector(table, table, broadcast)
                total = builder.add(total, builder.sext(shuffle(builder, wide, index), vs))
            return total

        return short_type(acc, tables, offset, codes, code_offset), codegen

    @intrinsic
    def float_zeros(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(vf, [0.0] * lanes)

        return float_type(), codegen

    @intrinsic
    def scaled_add(typingctx, total, acc, scale):
        def codegen(context, builder, sig, args):
            total, acc, scale = args
            splat = builder.insert_element(ir.Constant(vf, ir.Undefined), scale, ir.Constant(_I32, 0))
            splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))
            return builder.fadd(total, builder.fmul(builder.sitofp(acc, vf), splat))

        return float_type(total, acc, scale), codegen

    @intrinsic
    def store_sum(typingctx, out, offset, total, accumulate):
        def codegen(context, builder, sig, args):
            out, offset, total, accumulate = args
            pointer = _vector_pointer(context, builder, sig.args[0], out, offset, vf)
            previous = builder.load(pointer, align=4)
            builder.store(builder.select(accumulate, builder.fadd(previous, total), total), pointer, align=4)
            return context.get_dummy_value()

        return types.void(out, offset, total, accumulate), codegen

    return _namespace(f"byte_ops{lanes}", lanes=lanes, zeros=zeros, lookup_add=lookup_add, float_zeros=float_zeros,
                      scaled_add=scaled_add, store_sum=store_sum)


@intrinsic
def round_to_int8(typingctx, source, offset, target, target_offset, scale):
    """``target[target_offset:+16] = rint(source[offset:+16] * scale)`` as int8 (ties to even; the caller keeps
    the products within [-127.5, 127.5]). Plain LLVM vector IR: any CPU runs it."""
    def codegen(context, builder, sig, args):
        source, offset, target, target_offset, scale = args
        vf, vi, vb = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16), ir.VectorType(_I8, 16)
        values = builder.load(_vector_pointer(context, builder, sig.args[0], source, offset, vf), align=4)
        splat = builder.insert_element(ir.Constant(vf, ir.Undefined), scale, ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(splat, splat, ir.Constant(vi, [0] * 16))
        rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf]), "llvm.rint.v16f32")
        rounded = builder.fptosi(builder.call(rint, [builder.fmul(values, splat)]), vi)
        pointer = _vector_pointer(context, builder, sig.args[2], target, target_offset, vb)
        builder.store(builder.trunc(rounded, vb), pointer, align=1)
        return context.get_dummy_value()

    return types.void(source, offset, target, target_offset, scale), codegen


@intrinsic
def prefetch(typingctx, array, offset):
    """Hint the CPU to load the cache line of ``array[offset]`` into all cache levels. A prefetch never
    faults, so ``offset`` may run past the end of the array."""
    def codegen(context, builder, sig, args):
        pointer = builder.bitcast(_element_pointer(context, builder, sig.args[0], args[0], args[1]),
                                  _I8.as_pointer())
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0i8")
        builder.call(fn, [pointer, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(array, offset), codegen


@intrinsic
def float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the uint32 ``bits`` (a bitcast: no conversion, no rounding)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _F32)

    return types.float32(types.uint32), codegen


@intrinsic
def bits_of_float(typingctx, value):
    """The uint32 bit pattern of the float32 ``value`` (a bitcast)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I32)

    return types.uint32(types.float32), codegen
