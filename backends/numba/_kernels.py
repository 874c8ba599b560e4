"""Numba kernels of the BinaryMoS layer, in float32.

Shapes: M tokens, K inputs padded to Kp = 32 * ceil(K / 32), N outputs padded to Np (a multiple of the lanes),
E experts. Group g holds inputs 4g .. 4g + 3; byte j of a packed row holds groups 2j (low nibble) and 2j + 1
(high nibble), bit b of a nibble being the sign of input 4g + b (format v1).

1. `scales`: the gates and x * s_in per token (g @ s_out is applied in the kernels' epilogue).
2. For the lookup paths, `exact_tables` and a lookup kernel: `lookup_kernel(lanes)` for the SIMD paths
   (one output row per lane, see _simd.py) or `portable_kernel` (scalar, on the format v1 bytes). Both write
   ``out[m, n] = (sum_g table[m, g][code(n, g)]) * (gates[m] @ s_out)[n] + bias[n]``.
   The fast mode (`mosbits.precision`): `fast_tables` (int8 tables and their grids) and `fast_kernel(lanes)`
   (``pshufb``, one row per byte lane) or `portable_fast_kernel`, with the same output.
   Each table builder and `scales` has a `serial` twin for one or two tokens.
3. For large batches, `unpack_rows` (float32) or `unpack_rows_bf16` (bfloat16 bits) turns row tiles of B into
   the operand of a BLAS-class matmul (in __init__.py), and `scale_rows` applies the output scale and bias.
"""

from __future__ import annotations

import functools
import types as pytypes

import numpy as np
from numba import literal_unroll, njit, prange

from mosbits.backends.numba import _simd
from mosbits.precision import FAST_BLOCK, FAST_LEVELS

FASTMATH = {"reassoc", "contract"}
"""Reassociation lets LLVM vectorise reductions; NaN and inf keep their meaning (no nnan / ninf)."""

K_TILE = 128
"""Byte columns (256 groups of 4 inputs) per tile: a token's float32 table slice is 16 KiB and stays in L1 while
the kernel sweeps a chunk of row blocks (measured best of 64..512 at K = 4096 and 11008)."""

GRID_BYTES = FAST_BLOCK // 8
"""Byte columns per block of the fast mode's int8 grid (a divisor of K_TILE): the int16 sums of one block stay
exact (2 * GRID_BYTES * 127 < 2^15) and are scaled into a float32 sum per tile."""

ROW_CHUNKS = {"exact": (8, 32), "fast": (4, 8)}
"""Row blocks per parallel work item, (for one or two tokens, for more): a chunk's codes for one K tile stay in
L2 while the kernel runs every token over them, so many tokens want big chunks, while at batch 1 small chunks
keep both threads streaming. Measured here (kernel alone, 4096 x 4096): exact M = 1 from DRAM 107 us with 8
against 120 with 32, M = 512 39 ms with 32 against 62 with 8; fast M = 1 from DRAM 80 us with 4 against 96 with
8, M = 512 21.6 ms with 8 against 22.6 with 4."""

TABLE_BYTES = 4 << 20
"""Tokens are processed in blocks whose float32 tables (16 * Kp bytes a token) fit this: 64 tokens at
K = 4096. Building all 512 tokens' tables at once wrote (and page-faulted) 32 MiB a call: M = 512 at 4096 x 4096
took 55 ms, 45 ms in blocks."""

SMALLEST_NORMAL = np.float32(2.0**-126)
"""Gates below this are flushed to zero: a peaked router otherwise leaves subnormal gates, and every product with
a subnormal runs ~10x slower on x86 (M = 512 scales: 10 ms instead of 3). Such a gate's share of s_in or s_out
is below 2^-126 of the largest gate's (>= 1/E), far under float32 resolution."""

SIGN_OF_BIT = np.array([[1.0 if (code >> bit) & 1 else -1.0 for bit in range(4)] for code in range(16)],
                       dtype=np.float32)
"""(16, 4): the sign of input b in the group whose 4 bits are ``code``."""


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _token_gates(x, router):
    """(E,) float32 softmax(x @ router.T) of one token x (K,)."""
    e_count, k = router.shape
    gates = np.empty(e_count, dtype=np.float32)
    for e in range(e_count):
        logit = np.float32(0.0)
        for i in range(k):
            logit += x[i] * router[e, i]
        gates[e] = logit
    gates = np.exp(gates - gates.max())
    gates /= gates.sum()
    for e in range(e_count):
        if gates[e] < SMALLEST_NORMAL:
            gates[e] = 0
    return gates


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _token_scales(x, router, s_in, xs):
    """One token x (K,): xs (Kp,) = x * (g @ s_in) (xs arrives zeroed); returns g = softmax(x @ router.T)."""
    e_count, k = router.shape
    gates = _token_gates(x, router)
    for e in range(e_count):
        gate = gates[e]
        for i in range(k):
            xs[i] += gate * s_in[e, i]
    for i in range(k):
        xs[i] *= x[i]
    return gates


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def scales(x, router, s_in, kp, poison):
    """The token-adaptive input scales, applied to the inputs.

    Args:
        x: (M, K) float32; router, s_in: (E, K) float32; kp: K padded to 32; poison: fill the gates with NaN
            before they are computed (tests, `mosbits.arrays.poisoning`).

    Returns:
        xs: (M, Kp) float32, x * (g @ s_in) with g = softmax(x @ router.T), zero past K.
        gates: (M, E) float32, g; the kernels apply g @ s_out in their epilogue (`_finish_rows`).
    """
    m_count, e_count = x.shape[0], router.shape[0]
    xs = np.zeros((m_count, kp), dtype=np.float32)
    gates = np.empty((m_count, e_count), dtype=np.float32)
    if poison:
        gates[:] = np.nan
    for m in prange(m_count):
        gates[m] = _token_scales(x[m], router, s_in, xs[m])
    return xs, gates


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _output_scales(gates, s_out, c0, total):
    """total[i] = (gates @ s_out)[c0 + i] for i < len(total), one token: gates (E,), s_out (E, N) (fastest with
    C-contiguous rows).

    The loops index 1-D slices from 0: indexed as ``s_out[e, c0 + i]``, Numba's wrap-around of negative indices
    kept LLVM from vectorising them (5x slower here)."""
    count = total.shape[0]
    total[:] = 0
    for e in range(gates.shape[0]):
        gate = gates[e]
        column = s_out[e][c0:c0 + count]
        for i in range(count):
            total[i] += gate * column[i]


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _finish_rows(values, gates, s_out, bias, c0, scale):
    """values = values * (gates @ s_out[:, c0:c1]) + bias[c0:c1] for one token's outputs of columns c0..c1,
    ``values`` (c1 - c0,) float32, in place: gates (E,), s_out (E, N), bias (N,), scale a float32
    scratch of at least c1 - c0."""
    count = values.shape[0]
    total = scale[:count]
    _output_scales(gates, s_out, c0, total)
    shift = bias[c0:c0 + count]
    for i in range(count):
        values[i] = values[i] * total[i] + shift[i]


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _group_table(xs, g, table, offset):
    """table[offset + c] = sum_b SIGN_OF_BIT[c, b] xs[4 g + b] for the 16 codes c; returns sum_b |xs[4 g + b]|."""
    signs = SIGN_OF_BIT
    a0, a1, a2, a3 = xs[4 * g], xs[4 * g + 1], xs[4 * g + 2], xs[4 * g + 3]
    for c in range(16):
        table[offset + c] = a0 * signs[c, 0] + a1 * signs[c, 1] + a2 * signs[c, 2] + a3 * signs[c, 3]
    return abs(a0) + abs(a1) + abs(a2) + abs(a3)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def exact_tables(xs, poison):
    """tables (M, Kp / 4 * 16) float32 of xs (M, Kp): tables[m, 16 g + c] = sum_b SIGN_OF_BIT[c, b] xs[m, 4 g + b]
    (filled with NaN first when ``poison``)."""
    m_count, kp = xs.shape
    tables = np.empty((m_count, kp // 4 * 16), dtype=np.float32)
    if poison:
        tables[:] = np.nan
    for m in prange(m_count):
        for g in range(kp // 4):
            _group_table(xs[m], g, tables[m], 16 * g)
    return tables


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def fast_tables(xs, poison):
    """The int8 tables of the fast mode (`mosbits.precision`) of xs (M, Kp); with ``poison`` the tables start
    at -128 (a value rounding never produces: entries lie in [-127, 127]) and the grids at NaN.

    Returns:
        tables: (M, Kp / 4 * 16) int8, ``rint(exact table / deltas[m, t])`` for the groups of block t.
        deltas: (M, ceil(Kp / FAST_BLOCK)) float32, block t's grid: max over its groups of sum |xs| / 127
            (0 for an all-zero block, whose entries are then 0).
    """
    m_count, kp = xs.shape
    groups, block_groups = kp // 4, FAST_BLOCK // 4
    n_blocks = -(-groups // block_groups)
    tables = np.empty((m_count, 16 * groups), dtype=np.int8)
    deltas = np.empty((m_count, n_blocks), dtype=np.float32)
    if poison:
        tables[:] = -128
        deltas[:] = np.nan
    for m in prange(m_count):
        exact = np.empty(16 * block_groups, dtype=np.float32)
        for t in range(n_blocks):
            g0 = t * block_groups
            g1 = min(groups, g0 + block_groups)
            top = np.float32(0.0)
            for g in range(g0, g1):
                top = max(top, _group_table(xs[m], g, exact, 16 * (g - g0)))
            inverse = np.float32(FAST_LEVELS) / top if top > 0 else np.float32(0.0)
            deltas[m, t] = top / np.float32(FAST_LEVELS)
            for g in range(g0, g1):
                _simd.round_to_int8(exact, 16 * (g - g0), tables[m], 16 * g, inverse)
    return tables, deltas


def _variant(template, name: str, parallel: bool, inline: bool = False, **bound):
    """``template`` compiled under its own name, with module globals replaced by ``bound`` (and inlined into its
    callers when ``inline``).

    Kernels that differ only in a constant or in the functions they call (the lanes, the SIMD operations, the
    per-block body, the thread pool) are written once as a template and specialised here. Each specialisation
    is a module-level function of its own name, so Numba's disk cache keeps it (it keys entries by qualified
    name and bytecode, and cannot cache closures over intrinsics: every process recompiled those, about 1.5 s
    per kernel).
    """
    copy = pytypes.FunctionType(template.__code__, {**template.__globals__, **bound}, name, template.__defaults__,
                                template.__closure__)
    copy.__qualname__ = name
    return njit(parallel=parallel, fastmath=FASTMATH, cache=True, inline="always" if inline else "never")(copy)


def serial(kernel):
    """``kernel`` compiled without the thread pool: for a token or two, waking the pool costs more than the
    work."""
    return _variant(kernel.py_func, f"{kernel.py_func.__name__}_serial", parallel=False)


scales_serial = serial(scales)
exact_tables_serial = serial(exact_tables)
fast_tables_serial = serial(fast_tables)

SIMD = _simd.ops(16)
"""In the kernel templates: the `_simd` namespace of the variant being compiled (bound by `_variant`)."""
LANES = 16
"""In the kernel templates: rows per block of the variant being compiled (bound by `_variant`)."""
BLOCK, PREFETCH_BLOCKS = None, 1
"""In the sweep template: the per-block body of the variant and its prefetch distance in row blocks (bound by
`_variant`)."""
SCALES, TABLES, KERNEL, ROW_CHUNK = scales, exact_tables, None, ROW_CHUNKS["exact"][1]
"""In the layer template: the functions the variant calls and its kernel's row chunk (bound by `_variant`)."""


def _sweep_template(lookup, blocks, gates, s_out, bias, out, row_chunk):
    m_count = gates.shape[0]
    n = s_out.shape[1]
    n_blocks = blocks.shape[0]
    kbytes = blocks.shape[1] // LANES
    ahead = (PREFETCH_BLOCKS if blocks.shape[1] >= PREFETCH_WIDE_BYTES else 1) * blocks.shape[1]
    for chunk in prange(-(-n_blocks // row_chunk)):
        b0 = chunk * row_chunk
        b1 = min(n_blocks, b0 + row_chunk)
        for t0 in range(0, kbytes, K_TILE):
            t1 = min(kbytes, t0 + K_TILE)
            for m in range(m_count):
                row = out[m]
                for b in range(b0, b1):
                    BLOCK(lookup, m, blocks[b], t0, t1, ahead, row, LANES * b)
        scale = np.empty(LANES * row_chunk, dtype=np.float32)
        for m in range(m_count):
            _finish_rows(out[m][LANES * b0:min(n, LANES * b1)], gates[m], s_out, bias, LANES * b0, scale)


def _exact_block_template(tables, m, codes, t0, t1, ahead, row, offset):
    table = tables[m]
    acc0, acc1, acc2, acc3 = SIMD.zeros(), SIMD.zeros(), SIMD.zeros(), SIMD.zeros()
    for j in range(t0, t1, 2):
        _simd.prefetch(codes, LANES * j + ahead)
        c0 = SIMD.load_codes(codes, LANES * j)
        c1 = SIMD.load_codes(codes, LANES * j + LANES)
        acc0 = SIMD.lookup_add(acc0, table, 32 * j, c0)
        acc1 = SIMD.lookup_add(acc1, table, 32 * j + 16, SIMD.high_nibbles(c0))
        acc2 = SIMD.lookup_add(acc2, table, 32 * j + 32, c1)
        acc3 = SIMD.lookup_add(acc3, table, 32 * j + 48, SIMD.high_nibbles(c1))
    total = SIMD.add(SIMD.add(acc0, acc1), SIMD.add(acc2, acc3))
    if t0 > 0:
        total = SIMD.add(total, SIMD.load(row, offset))
    SIMD.store(row, offset, total)


def _fast_block_template(lookup, m, codes, t0, t1, ahead, row, offset):
    tables, deltas = lookup
    table = tables[m]
    total = SIMD.float_zeros()
    for s0 in range(t0, t1, GRID_BYTES):
        acc = SIMD.zeros()
        for j in range(s0, min(t1, s0 + GRID_BYTES)):
            _simd.prefetch(codes, LANES * j + ahead)
            acc = SIMD.lookup_add(acc, table, 32 * j, codes, LANES * j)
        total = SIMD.scaled_add(total, acc, deltas[m, s0 // GRID_BYTES])
    SIMD.store_sum(row, offset, total, t0 > 0)


PREFETCH_AHEAD = {"exact": 2, "fast": 1}
"""How many row blocks ahead the kernels prefetch the codes they will read at the same step, for row blocks of
at least PREFETCH_WIDE_BYTES (narrower blocks: one ahead). Measured on an AVX-512 EPYC (2 threads, weights in
DRAM, 4 alternating pairs): the exact kernel at 4096 x 4096 took 0.084-0.090 ms two blocks ahead against
0.094-0.103 one block ahead, at 11008 x 4096 0.177-0.197 against 0.197-0.208; the fast kernel, near the memory rate
already, was no better (0.0615 against 0.059 at 4096 x 4096). SmolLM2-135M's narrow layers (blocks of 1.1-3 KiB)
decoded about 2% slower two ahead (4 alternating process pairs), hence the width condition."""
PREFETCH_WIDE_BYTES = 4096


def _sweep(name: str, block_template, simd, lanes: int, prefetch_blocks: int):
    block = _variant(block_template, f"{name}_block", False, inline=True, SIMD=simd, LANES=lanes)
    return _variant(_sweep_template, name, True, BLOCK=block, LANES=lanes, PREFETCH_BLOCKS=prefetch_blocks)


@functools.cache
def lookup_kernel(lanes: int):
    """The SIMD lookup kernel for 16 (AVX-512) or 8 (AVX2) lanes (compiled on first use, then cached on disk).

    kernel(tables (M, Kp / 4 * 16), blocks (Np / lanes, Kp / 8 * lanes) uint8, gates (M, E), s_out (E, N),
    bias (N,), out (M, Np), row_chunk): ``blocks[b, lanes * j + r]`` is byte j of row ``lanes * b + r`` (the
    derived layout of layout.py), so one load gives the codes of ``lanes`` rows for two groups. Work is split into
    chunks of ``row_chunk`` row blocks (ROW_CHUNKS); within a chunk the kernel walks K in tiles of K_TILE byte
    columns and, per tile, every token over every block, keeping partial sums in ``out``; then it applies
    g @ s_out and the bias to the chunk's rows (columns past N keep raw sums).

    Each step prefetches the codes that a later row block reads at the same step ("ahead", `PREFETCH_AHEAD`):
    with the weights in DRAM, the hardware prefetchers alone left the kernels far behind a plain read of the
    same bytes (4096 x 4096, 2 threads: exact 0.18 ms, fast 0.17 ms, a torch sum of the 2 MiB 0.10 ms); with one
    block ahead, 0.12 and 0.11 ms.
    """
    return _sweep(f"lookup_kernel_{lanes}", _exact_block_template, _simd.ops(lanes), lanes, PREFETCH_AHEAD["exact"])


@functools.cache
def fast_kernel(lanes: int):
    """The fast-mode SIMD kernel for 64 (AVX-512BW) or 32 (AVX2) rows per block (compiled on first use, then
    cached on disk).

    kernel((tables (M, Kp / 4 * 16) int8, deltas (M, ceil(Kp / FAST_BLOCK))), blocks (Np / lanes,
    Kp / 8 * lanes) uint8, gates (M, E), s_out (E, N), bias (N,), out (M, Np), row_chunk): the sweep of
    `lookup_kernel` (blocks, chunks, tiles, epilogue, prefetching) with the int8 block body: within a tile, the
    lookups of each grid block (GRID_BYTES byte columns) add up exactly in int16 and are scaled by the block's
    grid step into a float32 sum.
    """
    return _sweep(f"fast_kernel_{lanes}", _fast_block_template, _simd.byte_ops(lanes), lanes, PREFETCH_AHEAD["fast"])


def _layer_template(x, router, s_in, s_out, bias, kp, codes, out, poison):
    xs, gates = SCALES(x, router, s_in, kp, poison)
    step = max(1, TABLE_BYTES // (16 * kp))
    for m0 in range(0, x.shape[0], step):
        m1 = min(x.shape[0], m0 + step)
        KERNEL(TABLES(xs[m0:m1], poison), codes, gates[m0:m1], s_out, bias, out[m0:m1], ROW_CHUNK)


@functools.cache
def layer_kernel(fast: bool, lanes: int, serial: bool):
    """The whole lookup path of a layer as one compiled call (a call from Python into Numba costs
    microseconds per argument, and at batch 1 a layer takes about 0.1 ms).

    run(x (M, K), router, s_in (E, K), s_out (E, N), bias (N,), kp, codes, out (M, Np), poison): `scales`, then, per
    block of tokens (TABLE_BYTES), `fast_tables` and `fast_kernel(lanes)` or `exact_tables` and `lookup_kernel(lanes)`;
    ``lanes`` 1 means the portable kernels, whose ``codes`` are the format v1 bytes (N, Kp / 8), the SIMD ones take
    row blocks. ``serial`` (for one or two tokens) picks the single-threaded scales and tables and the small row
    chunks.
    """
    if fast:
        tables = fast_tables_serial if serial else fast_tables
        kernel = portable_fast_kernel if lanes == 1 else fast_kernel(lanes)
    else:
        tables = exact_tables_serial if serial else exact_tables
        kernel = portable_kernel if lanes == 1 else lookup_kernel(lanes)
    name = f"layer_{'fast' if fast else 'exact'}_{lanes}_{'serial' if serial else 'parallel'}"
    row_chunk = ROW_CHUNKS["fast" if fast else "exact"][0 if serial else 1]
    return _variant(_layer_template, name, False, SCALES=scales_serial if serial else scales, TABLES=tables,
                    KERNEL=kernel, ROW_CHUNK=row_chunk)


@njit(cache=True)
def bfloat16_to_float32(bits, out):
    """out (M, K) float32 = the bfloat16 values whose 16-bit patterns are ``bits`` (M, K) int16 (exact)."""
    wide = out.view(np.uint32)
    for m in range(bits.shape[0]):
        for i in range(bits.shape[1]):
            wide[m, i] = np.uint32(np.uint16(bits[m, i])) << np.uint32(16)


@njit(cache=True, inline="always")
def _bfloat16_bits(u):
    """The bfloat16 pattern (int16) of the float32 whose bits are ``u`` (uint32), rounded to nearest even as
    torch rounds (bit for bit, checked against torch); a NaN stays a NaN (the quiet 0x7FC0 with its sign)."""
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        half = (u >> np.uint32(16)) & np.uint32(0x8000) | np.uint32(0x7FC0)
    else:
        half = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.int16(np.uint16(half))


@njit(cache=True)
def float32_to_bfloat16(values, n, out):
    """out (M, N) int16 = the bfloat16 patterns of values[:, :n] (float32), rounded as `_bfloat16_bits`."""
    wide = values.view(np.uint32)
    for m in range(out.shape[0]):
        for i in range(n):
            out[m, i] = _bfloat16_bits(wide[m, i])


def _group_template(x, kp, layers, out, poison):
    m = x.shape[0]
    for layer in literal_unroll(layers):
        router, s_in, s_out, bias, codes, np_, start = layer
        LAYER(x, router, s_in, s_out, bias, kp, codes, out[m * start:m * (start + np_)].reshape((m, np_)), poison)


def _group_bf16_template(bits, kp, layers, out_bits, poison):
    m = bits.shape[0]
    x = np.empty(bits.shape, dtype=np.float32)
    bfloat16_to_float32(bits, x)
    for layer in literal_unroll(layers):
        router, s_in, s_out, bias, codes, np_, n, start = layer
        out = np.empty((m, np_), dtype=np.float32)
        if poison:
            out[:] = np.nan
        LAYER(x, router, s_in, s_out, bias, kp, codes, out, poison)
        float32_to_bfloat16(out, n, out_bits[m * start:m * (start + n)].reshape((m, n)))


LAYER = None
"""In the group templates: the float32 layer kernel they call per layer (bound by `_variant`)."""


@functools.cache
def group_kernel(fast: bool, lanes: int, serial: bool, bf16: bool):
    """The lookup path of layers that read the same tokens, as one compiled call (`layer_kernel` for each in
    turn): one call from Python instead of one per layer, and for bfloat16 tokens one conversion of the input.

    run(x (M, K) float32, kp, layers, out, poison), ``layers`` a tuple with one tuple per layer: the constant
    arguments `layer_kernel` takes (router, s_in, s_out, bias, codes), then Np and ``start``, the sum of the Np of
    the layers before it; ``out`` (M * sum Np,) float32 holds each layer's (M, Np) output in turn, from element
    M * start (one array for the group: a call builds no tuples). With ``bf16``: run(bits (M, K) int16, kp, layers,
    out_bits, poison), each layer's tuple (router, s_in, s_out, bias, codes, Np, N, start) with ``start`` the sum of
    the N before it, and out_bits (M * sum N,) int16 holding the (M, N) outputs: the tokens' bfloat16 patterns go
    in and y's come out (rounded to nearest even as torch rounds), with no torch conversion on either side (those
    two conversions were about a fifth of a packed SmolLM2-135M decode step, `mosbits bench --model`). Each
    layer's output is bit for bit that of a call of its own: the same kernels run on the same float32 tokens.
    """
    mode = f"{'fast' if fast else 'exact'}_{lanes}_{'serial' if serial else 'parallel'}"
    name = f"group_bf16_{mode}" if bf16 else f"group_{mode}"
    template = _group_bf16_template if bf16 else _group_template
    return _variant(template, name, False, LAYER=layer_kernel(fast, lanes, serial))


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _row_scale(gates, s_out, i):
    """(g @ s_out)[i] for one token's gates (E,), summed as `_finish_rows` does."""
    scale = np.float32(0.0)
    for e in range(gates.shape[0]):
        scale += gates[e] * s_out[e, i]
    return scale


@njit(parallel=True, cache=True)
def portable_kernel(tables, data, gates, s_out, bias, out, row_chunk):
    """Scalar lookups on the format v1 bytes, for CPUs without AVX2: data (N, Kp / 8) uint8, the rest as in
    the SIMD kernel (out (M, Np), only the first N columns written; one row per work item, so ``row_chunk`` is
    unused)."""
    m_count = tables.shape[0]
    n, kbytes = data.shape
    for i in prange(n):
        for m in range(m_count):
            table = tables[m]
            low = np.float32(0.0)
            high = np.float32(0.0)
            for j in range(kbytes):
                byte = data[i, j]
                low += table[32 * j + (byte & 15)]
                high += table[32 * j + 16 + (byte >> 4)]
            out[m, i] = (low + high) * _row_scale(gates[m], s_out, i) + bias[i]


@njit(parallel=True, cache=True)
def portable_fast_kernel(lookup, data, gates, s_out, bias, out, row_chunk):
    """Scalar int8 lookups on the format v1 bytes: data (N, Kp / 8) uint8, the rest as in `fast_kernel`
    (out (M, Np), only the first N columns written; ``row_chunk`` unused)."""
    tables, deltas = lookup
    m_count = tables.shape[0]
    n, kbytes = data.shape
    for i in prange(n):
        for m in range(m_count):
            table = tables[m]
            total = np.float32(0.0)
            for s0 in range(0, kbytes, GRID_BYTES):
                acc = 0
                for j in range(s0, min(kbytes, s0 + GRID_BYTES)):
                    byte = data[i, j]
                    acc += table[32 * j + (byte & 15)] + table[32 * j + 16 + (byte >> 4)]
                total += np.float32(acc) * deltas[m, s0 // GRID_BYTES]
            out[m, i] = total * _row_scale(gates[m], s_out, i) + bias[i]


SIGN_OF_BYTE = np.array([[1.0 if (byte >> bit) & 1 else -1.0 for bit in range(8)] for byte in range(256)],
                        dtype=np.float32)
"""(256, 8): the signs of the 8 inputs held in one byte."""


@njit(cache=True)
def unpack_rows(data, n0, out):
    """out (rows, Kp) float32 = the signs of rows n0 .. n0 + rows of data (N, Kp / 8) uint8. Single-threaded,
    so that it never competes with the BLAS threads that consume the tile."""
    signs = SIGN_OF_BYTE
    rows, kp = out.shape
    for i in range(rows):
        for j in range(kp // 8):
            out[i, 8 * j:8 * j + 8] = signs[data[n0 + i, j]]


@njit(cache=True)
def unpack_rows_bf16(data, n0, out):
    """out (rows, Kp) uint16 = the bfloat16 bits of the signs of rows n0 .. n0 + rows of data (N, Kp / 8): 0x3F80
    (+1) for a set bit, 0xBF80 (-1) for a clear one. Single-threaded like `unpack_rows` (Numba's pool would spin
    on the cores torch's matmul runs on next), and arithmetic rather than a table lookup, which vectorises: a
    1024 x 4096 tile in 0.42 ms against 2.4 ms."""
    rows, kp = out.shape
    for i in range(rows):
        for j in range(kp // 8):
            byte = np.uint16(data[n0 + i, j])
            for b in range(8):
                out[i, 8 * j + b] = np.uint16(0xBF80) ^ (((byte >> b) & np.uint16(1)) << np.uint16(15))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def scale_rows(out, gates, s_out, bias):
    """out (M, N) = out * (gates @ s_out) + bias, in place; gates (M, E), s_out (E, N), bias (N,)."""
    m_count, n = out.shape
    for m in prange(m_count):
        _finish_rows(out[m], gates[m], s_out, bias, 0, np.empty(n, dtype=np.float32))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def scales_bf16(bits, router, s_in, kp, poison):
    """The gemm path's input side for bfloat16 tokens, in one pass: `scales`, rounded to bfloat16 as a dense
    bfloat16 matmul rounds its input.

    Args:
        bits: (M, K) int16, the tokens' bfloat16 patterns; router, s_in: (E, K) float32; kp: K padded to 32;
            poison: fill the gates with NaN before they are computed (tests).

    Returns:
        xs_bits: (M, Kp) int16, the bfloat16 patterns of x * (g @ s_in), zero past K.
        gates: (M, E) float32.
    """
    m_count, k = bits.shape
    xs_bits = np.zeros((m_count, kp), dtype=np.int16)
    gates = np.empty((m_count, router.shape[0]), dtype=np.float32)
    if poison:
        gates[:] = np.nan
    for m in prange(m_count):
        x = np.empty(k, dtype=np.float32)
        bfloat16_to_float32(bits[m:m + 1], x.reshape(1, k))
        xs = np.zeros(k, dtype=np.float32)
        gates[m] = _token_scales(x, router, s_in, xs)
        for i in range(k):
            xs_bits[m, i] = _bfloat16_of(xs[i])
    return xs_bits, gates


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def finish_bf16(product, gates, s_out, bias, n0, out_bits):
    """The gemm path's output side for one tile of rows, in one pass: out_bits[:, n0:n0 + T] = the bfloat16
    patterns of product * (gates @ s_out[:, n0:n0 + T]) + bias[n0:n0 + T], with product (M, T) int16 the
    bfloat16 patterns of a tile's matmul; gates (M, E), s_out (E, N), bias (N,) float32; out_bits (M, N) int16."""
    m_count, t = product.shape
    shift = bias[n0:n0 + t]
    for m in prange(m_count):
        total = np.empty(t, dtype=np.float32)
        _output_scales(gates[m], s_out, n0, total)
        products, out = product[m], out_bits[m][n0:n0 + t]
        for i in range(t):  # one fused loop: 2x faster than three passes over a float32 row
            value = _simd.float_from_bits(np.uint32(np.uint16(products[i])) << np.uint32(16)) * total[i] + shift[i]
            out[i] = _bfloat16_bits(_simd.bits_of_float(value))


@njit(parallel=True, cache=True)
def row_blocks(data, lanes, out):
    """out (Np / lanes, Kp / 8 * lanes) uint8 = the row blocks of data (N, Kp / 8) uint8 (`layout.row_blocks`):
    ``out[b, lanes * j + r] = data[lanes * b + r, j]``, zero for rows past N."""
    n, kbytes = data.shape
    for b in prange(out.shape[0]):
        for r in range(lanes):
            row = lanes * b + r
            if row < n:
                for j in range(kbytes):
                    out[b, lanes * j + r] = data[row, j]
            else:
                for j in range(kbytes):
                    out[b, lanes * j + r] = 0


DENSE_ROWS = 16
"""Weight rows per parallel work item of the dense kernels: 16 rows of a 4096-wide bfloat16 matrix are 128 KiB."""
HIGH_HALF = np.uint32(0xFFFF0000)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _bf16_pairs_dot(words, even, odd):
    """sum_j W[2j] even[j] + W[2j + 1] odd[j] in float32 for one row of bfloat16 patterns two to a uint32 word
    (little-endian: element 2j in the low half). A bfloat16 is the top half of a float32, so each half becomes a
    float32 by a shift or a mask, with no conversion: the row streams at memory speed."""
    acc = np.float32(0.0)
    for j in range(words.shape[0]):
        u = words[j]
        acc += _simd.float_from_bits(u << np.uint32(16)) * even[j] + _simd.float_from_bits(u & HIGH_HALF) * odd[j]
    return acc


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _f32_dot(row, x, _):
    acc = np.float32(0.0)
    for j in range(row.shape[0]):
        acc += row[j] * x[j]
    return acc


@njit(cache=True, inline="always")
def _bfloat16_of(value):
    return _bfloat16_bits(_simd.bits_of_float(value))


@njit(cache=True, inline="always")
def _same(value):
    return value


DOT, FINISH = _f32_dot, _same
"""In the dense template: the row's dot product and the output's conversion (bound by `_variant`)."""


def _dense_template(rows, x_a, x_b, bias, out):
    for chunk in prange(-(-rows.shape[0] // DENSE_ROWS)):
        for r in range(chunk * DENSE_ROWS, min(rows.shape[0], (chunk + 1) * DENSE_ROWS)):
            row = rows[r]
            for m in range(x_a.shape[0]):
                out[m, r] = FINISH(DOT(row, x_a[m], x_b[m]) + bias[r])


dense_bf16 = _variant(_dense_template, "dense_bf16", True, DOT=_bf16_pairs_dot, FINISH=_bfloat16_of)
"""dense_bf16(words (V, K / 2) uint32, x_even (M, K / 2) float32, x_odd (M, K / 2), bias (V,) float32,
out_bits (M, V) int16): y = x @ W.T + bias for a bfloat16 W whose patterns ``words`` holds two to a word
(`_bf16_pairs_dot`), x split into x[:, 0::2] and x[:, 1::2] (exact: x is bfloat16), summed in float32 and
rounded to bfloat16 patterns (`_bfloat16_bits`); each row of W is read once, for all M tokens."""
dense_f32 = _variant(_dense_template, "dense_f32", True)
"""dense_f32(w (V, K), x (M, K), x again (unused), bias (V,), out (M, V)), float32: out = x @ w.T + bias, each row
of w read once."""
