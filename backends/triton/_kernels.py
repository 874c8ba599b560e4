"""Triton kernels of the BinaryMoS layer. Private: `_host` validates, allocates and launches them.

The signs arrive as the format-v1 bytes viewed as int32 words, ``words (N, KW)`` with ``KW = ceil(K / 32)``:
bit j of word (n, w) is B[n, 32 w + j], 1 meaning +1 (docs/FORMAT.md, "Word view"). Kernels read that layout
directly, so no derived layout exists and nothing needs caching. A weight is decoded by moving its bit to the
float sign position, ``flip = (~word << (31 - j)) & SIGN_BIT`` (set where B = -1), which is XORed into
the activation (GEMV) or ORed into the bits of 1.0 (GEMM): shifts and masks over a vector of lanes, no branch.

- `gates_kernel`: gates (M, E) float32 = softmax(x @ router.T) over E.
- `gemv_kernel`: small M. Program (m, j) owns row m of x and rows [j BN, (j + 1) BN) of B, walks all of K.
- `gemm_kernel`: large M. Tiles of B are decoded to x's dtype in registers and fed to `tl.dot`.

Both matmul kernels scale x by ``g @ s_in`` while loading it and apply ``g @ s_out`` and the bias in the
epilogue, accumulating in float32 with int64 row offsets. Under ``TRITON_INTERPRET=1`` (read by triton when the
decorators below run) or ``MOSBITS_TRITON_AUTOTUNE=0`` each autotuned kernel has exactly one config (`AUTOTUNE`).
"""

import os

import triton
import triton.language as tl

INTERPRET: bool = bool(triton.knobs.runtime.interpret)
"""Whether these kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""

WORD_BITS: tl.constexpr = tl.constexpr(32)
SIGN_BIT: tl.constexpr = tl.constexpr(-(2**31))
"""The sign bit of an int32 or float32."""
ONE_F32_BITS: tl.constexpr = tl.constexpr(0x3F800000)
"""The bits of float32 1.0; ORing in the sign bit gives -1.0."""


GEMV_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=warps, num_stages=stages)
    for n, w, warps, stages in [(16, 8, 4, 3), (32, 4, 4, 3), (32, 8, 8, 3), (64, 4, 4, 3), (64, 8, 8, 3),
                                (128, 4, 8, 3), (32, 16, 8, 3)]
]
"""The GEMV's autotune configs. Wider N blocks reuse each scaled x element for more rows (about 4 instructions
per weight at 64 weights per thread, 5.5 at 32, read off the sm_90 SASS); narrower ones give more programs at
batch 1."""
GEMM_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
    for m, n, k, warps, stages in [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4),
                                   (64, 64, 32, 4, 4), (64, 64, 64, 8, 4), (64, 128, 64, 8, 3),
                                   (128, 64, 64, 8, 3), (128, 128, 32, 8, 4)]
]
"""The GEMM's autotune configs: tiles that keep float16 and bfloat16 free of register spills on sm_90
(cuobjdump -res-usage)."""
SINGLE_CONFIGS: dict[str, triton.Config] = {
    "gemv": triton.Config({"BLOCK_N": 64, "BLOCK_W": 4}),
    "gemm": triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128}),
}
"""The one config of each kernel when `AUTOTUNE` is off (the GEMM's spans two M tiles of 16-row batches)."""
AUTOTUNE_ENV = "MOSBITS_TRITON_AUTOTUNE"
AUTOTUNE: bool = not INTERPRET and os.environ.get(AUTOTUNE_ENV, "1") != "0"
"""Whether the matmul kernels autotune over `GEMV_CONFIGS` / `GEMM_CONFIGS` (the first call of each (M bucket, N,
K) times every config). Off in the interpreter, which cannot time, and when MOSBITS_TRITON_AUTOTUNE=0 at import:
then each kernel compiles only its `SINGLE_CONFIGS` entry, which makes a GPU test run several times faster
(`tests/test_triton_backend.py` checks every config on its own)."""


def _prune_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles taller than the M bucket needs (16 rows is the smallest tile `tl.dot` takes)."""
    rows = max(16, named_args["M_BUCKET"])
    return [c for c in configs if c.kwargs["BLOCK_M"] <= rows] or configs[:1]


@triton.jit
def gates_kernel(x_ptr, router_ptr, gates_ptr, M, K, stride_xm,
                 NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """gates (M, E) float32 = softmax(x (M, K) @ router (E, K).T) over E, logits accumulated in float32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    experts = tl.arange(0, BLOCK_E)  # [BE]
    logits = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # [BK]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)  # [BM, BK]
        r = tl.load(router_ptr + experts[:, None].to(tl.int64) * K + cols[None, :],
                    mask=(experts[:, None] < NUM_EXPERTS) & (cols[None, :] < K), other=0.0).to(tl.float32)  # [BE, BK]
        logits += tl.sum(x[:, None, :] * r[None, :, :], axis=2)  # [BM, BE]
    logits = tl.where(experts[None, :] < NUM_EXPERTS, logits, float("-inf"))
    z = tl.exp(logits - tl.max(logits, axis=1)[:, None])  # [BM, BE]
    gates = z / tl.sum(z, axis=1)[:, None]
    tl.store(gates_ptr + rows[:, None] * NUM_EXPERTS + experts[None, :], gates,
             mask=(rows[:, None] < M) & (experts[None, :] < NUM_EXPERTS))


@triton.jit
def _sign_flips(words, shifts):
    """int32 with only the sign bit set where the weight is -1: bit ``shifts`` of ``words`` is 0.

    One shift and one mask per weight; the XOR (or OR) that applies it fuses with the mask into one LOP3.
    """
    return (~words << (31 - shifts)) & SIGN_BIT


@triton.jit
def _output_scale(acc, gates_ptr, s_out_ptr, bias_ptr, rows, cols, row_mask, col_mask, N,
                  NUM_EXPERTS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc [R, C] * (g @ s_out) + bias, in float32 for the rows x cols of the output (one rounding with a bias)."""
    s_out = tl.zeros(acc.shape, dtype=tl.float32)  # [R, C]
    for e in tl.static_range(NUM_EXPERTS):
        g = tl.load(gates_ptr + rows * NUM_EXPERTS + e, mask=row_mask, other=0.0)  # [R, 1], or a scalar
        s_out += g * tl.load(s_out_ptr + e * N + cols, mask=col_mask, other=0.0).to(tl.float32)  # [R, C]
    if HAS_BIAS:
        y = tl.fma(acc, s_out, tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32))
    else:
        y = acc * s_out
    return y


@triton.autotune(configs=GEMV_CONFIGS if AUTOTUNE else [SINGLE_CONFIGS["gemv"]], key=["M_BUCKET", "N", "K"])
@triton.jit
def gemv_kernel(x_ptr, words_ptr, s_in_ptr, s_out_ptr, gates_ptr, bias_ptr, y_ptr,
                M, N, K, KW, stride_xm, M_BUCKET,
                NUM_EXPERTS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """y[m, n-block] for one row m of x (M, K): y (M, N) = ((x * (g @ s_in)) @ B.T) * (g @ s_out) + bias.

    x is read as [BW, 32] tiles (word, lane) matching the [BN, BW] word tiles of B, so no reshape is needed;
    the signed activations accumulate per lane in [BN, BW, 32] and are summed once after the K loop.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_mask = cols < N
    lanes = tl.arange(0, WORD_BITS)  # [32]
    acc = tl.zeros((BLOCK_N, BLOCK_W, WORD_BITS), dtype=tl.float32)
    for w0 in range(0, KW, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)  # [BW]
        k = w[:, None] * WORD_BITS + lanes[None, :]  # [BW, 32]
        k_mask = k < K
        s_in = tl.zeros((BLOCK_W, WORD_BITS), dtype=tl.float32)  # [BW, 32]
        for e in tl.static_range(NUM_EXPERTS):
            s_in += tl.load(gates_ptr + row * NUM_EXPERTS + e) * tl.load(
                s_in_ptr + e * K + k, mask=k_mask, other=0.0).to(tl.float32)
        xs = tl.load(x_ptr + row * stride_xm + k, mask=k_mask, other=0.0).to(tl.float32) * s_in  # [BW, 32]
        words = tl.load(words_ptr + cols[:, None] * KW + w[None, :],
                        mask=col_mask[:, None] & (w[None, :] < KW), other=0)  # [BN, BW]
        flips = _sign_flips(words[:, :, None], lanes[None, None, :])  # [BN, BW, 32]
        acc += (xs.to(tl.int32, bitcast=True)[None, :, :] ^ flips).to(tl.float32, bitcast=True)
    acc_n = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BN]
    y = _output_scale(acc_n[None, :], gates_ptr, s_out_ptr, bias_ptr, row, cols[None, :], row < M,
                      col_mask[None, :], N, NUM_EXPERTS, HAS_BIAS)  # [1, BN]
    tl.store(y_ptr + row * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=col_mask[None, :])


@triton.autotune(configs=GEMM_CONFIGS if AUTOTUNE else [SINGLE_CONFIGS["gemm"]], key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_gemm_configs})
@triton.jit
def gemm_kernel(x_ptr, words_ptr, s_in_ptr, s_out_ptr, gates_ptr, bias_ptr, y_ptr,
                M, N, K, KW, stride_xm, M_BUCKET,
                NUM_EXPERTS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BM, BN] tile of y (M, N) = ((x * (g @ s_in)) @ B.T) * (g @ s_out) + bias.

    ``x * s_in`` is rounded to x's dtype and B is decoded to +-1 in x's dtype for `tl.dot` (float32 accumulator;
    DOT_PRECISION "ieee" keeps float32 operands exact).
    """
    dtype = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_mask = rows < M
    col_mask = cols < N
    lanes = tl.arange(0, WORD_BITS)  # [32]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_mask = k < K
        s_in = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # [BM, BK]
        for e in tl.static_range(NUM_EXPERTS):
            g = tl.load(gates_ptr + rows * NUM_EXPERTS + e, mask=row_mask, other=0.0)  # [BM]
            s_in += g[:, None] * tl.load(s_in_ptr + e * K + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # [BM, BK]
        a = (x * s_in).to(dtype)  # [BM, BK]
        w = k0 // WORD_BITS + tl.arange(0, BLOCK_K // WORD_BITS)  # [BK / 32]
        words = tl.load(words_ptr + cols[None, :] * KW + w[:, None],
                        mask=(w[:, None] < KW) & col_mask[None, :], other=0)  # [BK / 32, BN]
        flips = _sign_flips(words[:, None, :], lanes[None, :, None])  # [BK / 32, 32, BN]
        b = tl.reshape((flips | ONE_F32_BITS).to(tl.float32, bitcast=True).to(dtype), (BLOCK_K, BLOCK_N))  # [BK, BN]
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    y = _output_scale(acc, gates_ptr, s_out_ptr, bias_ptr, rows[:, None], cols[None, :], row_mask[:, None],
                      col_mask[None, :], N, NUM_EXPERTS, HAS_BIAS)  # [BM, BN]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])
