"""The NumPy reference: the BinaryMoS layer written to be read, in float64. Ground truth for every backend.

Installed as ``mosbits.reference``. It imports nothing but NumPy: it reads ``packed.data`` / ``packed.shape``
and ``experts.s_in`` / ``experts.s_out`` by attribute, so it does not depend on the mosbits core it checks.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def pack(w: np.ndarray) -> np.ndarray:
    """Format v1 bytes of sign(w), one bit at a time.

    Weight (n, k) becomes bit ``k % 8`` of byte ``(n, k // 8)``; the bit is 1 when ``w[n, k] >= 0``.
    Rows are padded with zero bits to a multiple of 32 bits.

    Args:
        w: (N, K) finite floats.

    Returns:
        uint8 (N, 4 * ceil(K / 32)).
    """
    n, k = w.shape
    data = np.zeros((n, 4 * ((k + 31) // 32)), dtype=np.uint8)
    for col in range(k):
        bit = (w[:, col] >= 0).astype(np.uint8)
        data[:, col // 8] |= bit << (col % 8)
    return data


def unpack(data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The (N, K) float64 matrix of +1 / -1 held in format v1 bytes ``data``."""
    cols = np.arange(shape[1])
    bits = (data[:, cols // 8] >> (cols % 8).astype(np.uint8)) & 1
    return np.where(bits == 1, 1.0, -1.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def matmul(x: np.ndarray, packed: Any, experts: Any, router: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """The BinaryMoS layer in float64, cast to x's dtype at the end.

    Args:
        x: (..., K).
        packed: has ``.data`` (uint8 (N, 4 * ceil(K / 32))) and ``.shape`` (N, K).
        experts: has ``.s_in`` (E, K) and ``.s_out`` (E, N).
        router: (E, K).
        bias: (N,) or None.

    Returns:
        (..., N) of x's dtype.
    """
    signs = unpack(packed.data, packed.shape)
    xf = x.astype(np.float64)
    gates = softmax(xf @ router.astype(np.float64).T)
    s_in = gates @ experts.s_in.astype(np.float64)
    s_out = gates @ experts.s_out.astype(np.float64)
    y = ((xf * s_in) @ signs.T) * s_out
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y.astype(x.dtype)


def supports(x: Any, packed: Any, experts: Any, router: Any, bias: Any) -> tuple[bool, str]:
    """The reference runs NumPy arrays only."""
    if isinstance(x, np.ndarray) and isinstance(packed.data, np.ndarray):
        return True, ""
    return False, f"the reference takes numpy arrays, got {type(x).__module__}.{type(x).__name__}"


def product_dtype(x_dtype: str) -> str:
    """x * s_in enters the product in float64 here, finer than float32: the float32 bound covers it."""
    return "float32"
