"""The scaling experts of a BinaryMoS layer, and their initialisation from a latent weight."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mosbits import arrays


@dataclasses.dataclass(frozen=True)
class Experts:
    """E pairs of input and output channel scales.

    Attributes:
        s_in: (E, K) float array, one input scale vector per expert.
        s_out: (E, N) float array, one output scale vector per expert.

    Both live on the same library and device and share one float dtype (float16, bfloat16 or float32).
    """

    s_in: Any
    s_out: Any

    def __post_init__(self) -> None:
        for name in ("s_in", "s_out"):
            a = getattr(self, name)
            try:
                arrays.array_kind(a)
            except TypeError as err:
                raise TypeError(f"Experts.{name}: {err}") from None
            if a.ndim != 2:
                raise ValueError(f"Experts.{name} must be 2-D (E, {name[2:].upper()}), got shape {tuple(a.shape)}")
            if arrays.dtype_name(a) not in arrays.FLOAT_DTYPES:
                raise TypeError(
                    f"Experts.{name} must be one of {', '.join(arrays.FLOAT_DTYPES)}, got {arrays.dtype_name(a)}"
                )
        if self.s_in.shape[0] != self.s_out.shape[0] or self.s_in.shape[0] < 1:
            raise ValueError(
                "Experts.s_in (E, K) and Experts.s_out (E, N) must have the same E >= 1, got "
                f"s_in {tuple(self.s_in.shape)} and s_out {tuple(self.s_out.shape)}"
            )
        if arrays.dtype_name(self.s_in) != arrays.dtype_name(self.s_out):
            raise TypeError(
                f"Experts.s_in and s_out must share a dtype, got {arrays.dtype_name(self.s_in)} and "
                f"{arrays.dtype_name(self.s_out)}"
            )
        if arrays.array_kind(self.s_in) != arrays.array_kind(self.s_out) or arrays.device_of(
            self.s_in
        ) != arrays.device_of(self.s_out):
            raise ValueError(
                f"Experts.s_in and s_out must be on the same library and device, got "
                f"{arrays.array_kind(self.s_in)} ({arrays.device_of(self.s_in)}) and "
                f"{arrays.array_kind(self.s_out)} ({arrays.device_of(self.s_out)})"
            )

    @property
    def num_experts(self) -> int:
        return int(self.s_in.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.s_in.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.s_out.shape[1])

    @property
    def nbytes(self) -> int:
        return arrays.nbytes(self.s_in) + arrays.nbytes(self.s_out)

    @classmethod
    def from_weight(cls, w: np.ndarray, num_experts: int = 4, dtype: Any = np.float32) -> Experts:
        """BinaryMoS initialisation: every expert starts as the rank-1 factorisation of |W|.

        With |W| ~ sigma * u v^T (the leading singular triplet), ``s_out = sqrt(sigma) * u`` and
        ``s_in = sqrt(sigma) * v``, so at step 0 the layer equals OneBit's ``sign(W) * s_out s_in^T``.

        Args:
            w: (N, K) latent weight (NumPy).
            num_experts: E >= 1.
            dtype: dtype of the returned scales.
        """
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        s_out, s_in = rank1_abs_factors(w)
        return cls(
            np.repeat(s_in[None, :], num_experts, axis=0).astype(dtype),
            np.repeat(s_out[None, :], num_experts, axis=0).astype(dtype),
        )


def rank1_abs_factors(w: Any, iterations: int = 500, tol: float = 1e-12) -> tuple[Any, Any]:
    """Leading singular pair of |W| by power iteration, scaled as ``(sqrt(sigma) u, sqrt(sigma) v)``.

    |W| is entrywise nonnegative, so (Perron-Frobenius) its leading singular vectors can be taken nonnegative and
    the iteration from a positive start converges to them without a full SVD (which costs minutes at
    11008 x 4096). It stops when the unit vector v moves by less than ``tol``. One implementation serves NumPy
    arrays and torch tensors (the training adapter's, on their own device): it uses only operators both share.

    Args:
        w: (N, K) float array, NumPy or torch (any device; gradients are not tracked).

    Returns:
        (s_out (N,), s_in (K,)) float64 arrays of w's library and device, with ``s_out[:, None] * s_in[None, :]``
        the best rank-1 fit of |W|.
    """
    a = abs(w.detach().double()) if arrays.is_torch(w) else np.abs(np.asarray(w, dtype=np.float64))
    tiny = np.finfo(np.float64).tiny
    v = a[0] * 0 + a.shape[1] ** -0.5
    u, sigma = a[:, 0] * 0, 0.0
    for _ in range(iterations):
        u = a @ v
        u = u / max(float((u * u).sum()) ** 0.5, tiny)
        v_next = a.T @ u
        sigma = float((v_next * v_next).sum()) ** 0.5
        v_next = v_next / max(sigma, tiny)
        moved, v = float(((v_next - v) ** 2).sum()) ** 0.5, v_next
        if moved <= tol:
            break
    root = sigma ** 0.5
    return root * u, root * v
