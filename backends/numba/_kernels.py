"""Numba kernels of the BinaryMoS layer, in float32.

Shapes: M tokens, K inputs padded to Kp = 32 * ceil(K / 32), N outputs padded to Np (a multiple of the lanes),
E experts. Group g holds inputs 4g .. 4g + 3; byte j of a packed row holds groups 2j (low nibble) and 2j + 1
(high nibble), bit b of a nibble being the sign of input 4g + b (format v1).

1. `prepare`: gates, input scales, per-token lookup tables and output scales.
2. A lookup kernel: `lookup_kernel(ops)` for the SIMD paths (one output row per lane, see _simd.py), or
   `portable_kernel` (scalar, reads the format v1 bytes directly).
Both write ``out[m, n] = (sum_g table[m, g][code(n, g)]) * scale_out[m, n] + bias[n]``.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from mosbits.backends.numba import _simd

FASTMATH = {"reassoc", "contract"}
"""Reassociation lets LLVM vectorise reductions; NaN and inf keep their meaning (no nnan / ninf)."""

TOKEN_CHUNK = 4
"""Tokens processed per sweep over the weights: their lookup tables (4 x 16 floats per 4 inputs, 256 KiB at
K = 4096) stay in L2 while each row block's codes stay in L1."""

SIGN_OF_BIT = np.array([[1.0 if (code >> bit) & 1 else -1.0 for bit in range(4)] for code in range(16)],
                       dtype=np.float32)
"""(16, 4): the sign of input b in the group whose 4 bits are ``code``."""


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def prepare(x, router, s_in, s_out, bias, kp, np_):
    """Everything per token that the lookup kernels read.

    Args:
        x: (M, K) float32; router, s_in: (E, K) float32; s_out: (E, N) float32; bias: (N,) float32 (zeros when
            the layer has none); kp: K padded to 32; np_: N padded to the lanes.

    Returns:
        tables: (M, Kp / 4 * 16) float32; tables[m, 16 g + c] = sum_b SIGN_OF_BIT[c, b] * xs[m, 4 g + b] with
            xs = x * (g @ s_in), zero past K.
        scale_out: (M, Np) float32, g @ s_out, zero past N.
        bias_padded: (Np,) float32.
    """
    m_count, k = x.shape
    e_count, n = s_out.shape
    signs = SIGN_OF_BIT
    tables = np.empty((m_count, kp // 4 * 16), dtype=np.float32)
    scale_out = np.zeros((m_count, np_), dtype=np.float32)
    bias_padded = np.zeros(np_, dtype=np.float32)
    bias_padded[:n] = bias
    for m in prange(m_count):
        gates = np.empty(e_count, dtype=np.float32)
        for e in range(e_count):
            logit = np.float32(0.0)
            for i in range(k):
                logit += x[m, i] * router[e, i]
            gates[e] = logit
        gates = np.exp(gates - gates.max())
        gates /= gates.sum()
        xs = np.zeros(kp, dtype=np.float32)
        for i in range(k):
            scale = np.float32(0.0)
            for e in range(e_count):
                scale += gates[e] * s_in[e, i]
            xs[i] = x[m, i] * scale
        for g in range(kp // 4):
            a0, a1, a2, a3 = xs[4 * g], xs[4 * g + 1], xs[4 * g + 2], xs[4 * g + 3]
            for c in range(16):
                tables[m, 16 * g + c] = a0 * signs[c, 0] + a1 * signs[c, 1] + a2 * signs[c, 2] + a3 * signs[c, 3]
        for e in range(e_count):
            for i in range(n):
                scale_out[m, i] += gates[e] * s_out[e, i]
    return tables, scale_out, bias_padded


@functools.cache
def lookup_kernel(lanes: int):
    """The SIMD lookup kernel for 16 (AVX-512) or 8 (AVX2) lanes (compiled on first call).

    kernel(tables (M, Kp / 4 * 16), blocks (Np / lanes, Kp / 8 * lanes) uint8, scale_out (M, Np), bias (Np,),
    out (M, Np)): ``blocks[b, lanes * j + r]`` is byte j of row ``lanes * b + r`` (the derived layout of
    layout.py), so one load gives the codes of ``lanes`` rows for two groups.
    """
    ops = _simd.ops(lanes)
    zeros, load_codes, high_nibbles = ops.zeros, ops.load_codes, ops.high_nibbles
    lookup_add, add, store = ops.lookup_add, ops.add, ops.store

    @njit(parallel=True, cache=False)
    def kernel(tables, blocks, scale_out, bias, out):
        m_count = tables.shape[0]
        n_blocks = blocks.shape[0]
        kbytes = blocks.shape[1] // lanes
        for m0 in range(0, m_count, TOKEN_CHUNK):
            for b in prange(n_blocks):
                codes = blocks[b]
                for m in range(m0, min(m0 + TOKEN_CHUNK, m_count)):
                    table = tables[m]
                    acc0, acc1, acc2, acc3 = zeros(), zeros(), zeros(), zeros()
                    for j in range(0, kbytes, 2):
                        c0 = load_codes(codes, lanes * j)
                        c1 = load_codes(codes, lanes * j + lanes)
                        acc0 = lookup_add(acc0, table, 32 * j, c0)
                        acc1 = lookup_add(acc1, table, 32 * j + 16, high_nibbles(c0))
                        acc2 = lookup_add(acc2, table, 32 * j + 32, c1)
                        acc3 = lookup_add(acc3, table, 32 * j + 48, high_nibbles(c1))
                    row = out[m]
                    store(row, lanes * b, add(add(acc0, acc1), add(acc2, acc3)))
                    for i in range(lanes * b, lanes * b + lanes):
                        row[i] = row[i] * scale_out[m, i] + bias[i]

    return kernel


@njit(parallel=True, cache=True)
def portable_kernel(tables, data, scale_out, bias, out):
    """Scalar lookups on the format v1 bytes, for CPUs without AVX2: data (N, Kp / 8) uint8, the rest as in
    the SIMD kernel (out (M, Np), only the first N columns written)."""
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
            out[m, i] = (low + high) * scale_out[m, i] + bias[i]
