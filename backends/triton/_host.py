"""Host side of the Triton kernels: choose the path, validate, allocate, launch."""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton

from mosbits import arrays
from mosbits.backends.triton import _kernels
from mosbits.format import row_bytes

GEMV_MAX_M = 4
"""Tokens up to which `mos_matmul` takes the GEMV path; above, the GEMM path (tensor cores, 16-row tiles at
least, with each decoded tile of B shared by all its rows). Measured on an H200 (kernels alone, float16, LLaMA-7B
shapes, README "On a GPU"): at M = 4 a block's seven layers took 371 us by GEMV and 502 us by GEMM; at M = 16 the
GEMM won on every shape."""

PATH_ENV = "MOSBITS_TRITON_PATH"
PATHS = ("auto", "gemv", "gemm")
M_BUCKET_MAX = 1024
GATES_TILE = 8192
"""Elements of the [BM, BE, BK] product tile of the gates kernel: with few tokens its K blocks grow, so that a
batch-1 router takes a few loop steps rather than K / 128."""


def choose_path(m: int, path: str = "auto") -> str:
    """The kernel path for m tokens: ``path`` if it is "gemv" or "gemm"; for "auto", the value of
    MOSBITS_TRITON_PATH if set, else "gemv" when m <= GEMV_MAX_M and "gemm" otherwise.

    Raises:
        ValueError: ``path`` or MOSBITS_TRITON_PATH is not one of "auto", "gemv", "gemm".
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        path = os.environ.get(PATH_ENV, "auto") or "auto"
        if path not in PATHS:
            raise ValueError(f"{PATH_ENV} must be one of {PATHS}, got {path!r}")
    if path == "auto":
        return "gemv" if m <= GEMV_MAX_M else "gemm"
    return path


def m_bucket(m: int) -> int:
    """The autotuning bucket of m tokens: the next power of two, at most M_BUCKET_MAX."""
    return min(triton.next_power_of_2(m), M_BUCKET_MAX)


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on t's GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def gates(x2: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """softmax(x2 @ router.T) over E in float32: x2 (M, K) with unit column stride, router (E, K) contiguous ->
    (M, E)."""
    m, k = x2.shape
    e = router.shape[0]
    out = arrays.empty(x2, (m, e), torch.float32)
    if m:
        block_m, block_e = min(16, triton.next_power_of_2(m)), triton.next_power_of_2(e)
        block_k = max(16, min(1024, GATES_TILE // (block_m * block_e), triton.next_power_of_2(k)))
        with _on_device(x2):
            _kernels.gates_kernel[(triton.cdiv(m, block_m),)](
                x2, router, out, m, k, x2.stride(0), NUM_EXPERTS=e, BLOCK_E=block_e, BLOCK_M=block_m,
                BLOCK_K=block_k)
    return out


def _check(x: torch.Tensor, signs: torch.Tensor, k: int, s_in: torch.Tensor, s_out: torch.Tensor,
           router: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise a ValueError or TypeError naming the first argument that does not fit (for direct operator calls;
    `mosbits.matmul` has checked all this already)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if signs.dtype != torch.uint8:
        raise TypeError(f"signs must be uint8 (format v1 bytes), got {signs.dtype}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}), got {tuple(x.shape)}")
    n, e = signs.shape[0], s_in.shape[0]
    expected = {"signs": (signs, (n, row_bytes(k))), "s_in": (s_in, (e, k)), "s_out": (s_out, (e, n)),
                "router": (router, (e, k)), **({} if bias is None else {"bias": (bias, (n,))})}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if name != "signs" and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}")


def mos_matmul(x: torch.Tensor, signs: torch.Tensor, k: int, s_in: torch.Tensor, s_out: torch.Tensor,
               router: torch.Tensor, bias: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
    """y (..., N) = ((x * (g @ s_in)) @ B.T) * (g @ s_out) + bias with g = softmax(x @ router.T) in float32.

    Args:
        x: (..., K) float16, bfloat16 or float32.
        signs: uint8 (N, 4 * ceil(K / 32)), format v1.
        k: K, the logical number of columns of B.
        s_in: (E, K); s_out: (E, N); router: (E, K); bias: (N,) or None; all x's dtype and device.
        path: "auto", "gemv" or "gemm" (see `choose_path`).

    Returns:
        y of x's dtype and device. Besides y, a call allocates the (M, E) float32 gates, and copies x only when
        it cannot be viewed as (M, K) with unit column stride.
    """
    _check(x, signs, k, s_in, s_out, router, bias)
    return launch(x, signs.contiguous().view(torch.int32), k, s_in.contiguous(), s_out.contiguous(),
                  router.contiguous(), None if bias is None else bias.contiguous(), path)


def launch(x: torch.Tensor, words: torch.Tensor, k: int, s_in: torch.Tensor, s_out: torch.Tensor,
           router: torch.Tensor, bias: torch.Tensor | None, path: str = "auto",
           config: triton.Config | None = None) -> torch.Tensor:
    """`mos_matmul` without its checks, for arguments already checked and contiguous, the signs as int32
    ``words (N, ceil(K / 32))``. A prepared layer (`mosbits.backends.triton.TritonLayer`) calls it. ``config``
    runs the path's kernel with that one config instead of the autotuned choice (tests check every config)."""
    n, e = words.shape[0], s_in.shape[0]
    y = arrays.empty(x, (*x.shape[:-1], n))
    m = math.prod(x.shape[:-1])
    kernel_path = choose_path(m, path)
    if m == 0 or n == 0:
        return y
    x2 = x.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    g = gates(x2, router)
    bias_arg = s_in if bias is None else bias  # any pointer: HAS_BIAS=False never reads it
    args = (x2, words, s_in, s_out, g, bias_arg, y.view(m, n), m, n, k, words.shape[1], x2.stride(0), m_bucket(m))
    meta = {"NUM_EXPERTS": e, "HAS_BIAS": bias is not None}
    if kernel_path == "gemv":
        kernel, grid = _kernels.gemv_kernel, lambda c: (m, triton.cdiv(n, c["BLOCK_N"]))
    else:
        kernel, grid = _kernels.gemm_kernel, lambda c: (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(n, c["BLOCK_N"]))
        meta["DOT_PRECISION"] = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 (default) ignored for halves
    with _on_device(x):
        if config is None:
            kernel[grid](*args, **meta)
        else:
            options = {} if _kernels.INTERPRET else {"num_warps": config.num_warps, "num_stages": config.num_stages}
            kernel.fn[grid(config.kwargs)](*args, **meta, **config.kwargs, **options)
    return y
