"""The BinaryMoS layer in plain torch ops, on any device, differentiable.

The signs are unpacked TILE_BYTES at a time along N and never as a whole: for a layer (N, K), a call holds at
most ``4.5 * rows * Kp`` extra bytes for the signs, with ``Kp = 32 * ceil(K / 32)`` and
``rows = max(1, TILE_BYTES // (4 * Kp))`` (a float32 tile of ``rows`` x Kp plus its int32 byte index of
``rows * Kp / 8`` elements: 9 MiB with the default 8 MiB tile), whatever N is. The same holds in backward,
where only the packed bytes are saved. Everything after the inputs runs in float32; the result is cast to x's dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from mosbits import arrays
from mosbits.format import PackedSigns, row_bytes, unpack

TILE_BYTES = 8 << 20


def tile_rows(k: int) -> int:
    """Rows of B unpacked at once for K inputs."""
    return max(1, TILE_BYTES // (4 * 8 * row_bytes(k)))


def _sign_tiles(data: torch.Tensor, k: int):
    """Yield (n0, n1, B[n0:n1] as float32 (n1 - n0, K))."""
    step = tile_rows(k)
    for n0 in range(0, data.shape[0], step):
        n1 = min(n0 + step, data.shape[0])
        yield n0, n1, unpack(PackedSigns(data[n0:n1], (n1 - n0, k)), torch.float32)


class _SignProduct(torch.autograd.Function):
    """xs (M, K) float32 -> xs @ B.T (M, N), with B unpacked tile by tile in forward and backward."""

    @staticmethod
    def forward(ctx: Any, xs: torch.Tensor, data: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(data)
        ctx.k = k
        y = arrays.empty(xs, (xs.shape[0], data.shape[0]))
        for n0, n1, signs in _sign_tiles(data, k):
            y[:, n0:n1] = xs @ signs.T
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (data,) = ctx.saved_tensors
        grad_xs = torch.zeros(grad_y.shape[0], ctx.k, dtype=torch.float32, device=grad_y.device)
        for n0, n1, signs in _sign_tiles(data, ctx.k):
            grad_xs.addmm_(grad_y[:, n0:n1].float(), signs)
        return grad_xs, None, None


def matmul(x: torch.Tensor, packed: PackedSigns, experts: Any, router: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """y (..., N) = ((x * (g @ s_in)) @ B.T) * (g @ s_out) + bias with g = softmax(x @ router.T), x (..., K)."""
    n, k = packed.shape
    x2 = x.reshape(-1, k).float()
    gates = torch.softmax(x2 @ router.float().T, dim=-1)
    s_in = gates @ experts.s_in.float()
    s_out = gates @ experts.s_out.float()
    y = _SignProduct.apply(x2 * s_in, packed.data, k) * s_out
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def supports(x: Any, packed: PackedSigns, experts: Any, router: Any, bias: Any) -> tuple[bool, str]:
    if not arrays.is_torch(x):
        return False, f"the torch backend takes torch tensors, got {type(x).__name__}; use torch.from_numpy"
    return True, ""


def product_dtype(x_dtype: str) -> str:
    return "float32"
