"""The BinaryMoS layer in plain torch ops, on any device, differentiable.

The signs are unpacked TILE_BYTES at a time along N and never as a whole: for a layer (N, K), a call holds at
most ``4.5 * rows * Kp`` extra bytes for the signs, with ``Kp = 32 * ceil(K / 32)`` and
``rows = max(1, TILE_BYTES // (4 * Kp))`` (a float32 tile of ``rows`` x Kp plus its int32 byte index of
``rows * Kp / 8`` elements: 9 MiB with the default 8 MiB tile), whatever N is. The same holds in backward,
where only the packed bytes of the signs are saved. Everything after the inputs runs in float32; the result is
cast to x's dtype. For the backward a call keeps (K + N + E) floats per row of x beyond x itself (`_MoSProduct`).
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


class _MoSProduct(torch.autograd.Function):
    """x (M, K), router (E, K), s_in (E, K), s_out (E, N), all float32 -> ((x * (g @ s_in)) @ B.T) * (g @ s_out)
    (M, N) with g = softmax(x @ router.T); B is unpacked tile by tile in forward and backward.

    For the backward it keeps x, the gates g (M, E) and z = (x * (g @ s_in)) @ B.T (M, N), and recomputes the
    per-token scales g @ s_in and g @ s_out (rank-E products): torch's own graph of the same expression would
    also keep both scales and (M, K) + 2 (M, N) more floats, nearly doubling a training step's activations."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, router: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor,
                data: torch.Tensor, k: int) -> torch.Tensor:
        gates = torch.softmax(x @ router.T, dim=-1)
        xs = x * (gates @ s_in)
        z = arrays.empty(xs, (xs.shape[0], data.shape[0]))
        for n0, n1, signs in _sign_tiles(data, k):
            z[:, n0:n1] = xs @ signs.T
        ctx.save_for_backward(x, router, s_in, s_out, data, gates, z)
        ctx.k = k
        return z * (gates @ s_out)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, router, s_in, s_out, data, gates, z = ctx.saved_tensors
        grad_y = grad_y.float()
        grad_s_out_rows = grad_y * z
        grad_z = grad_y * (gates @ s_out)
        del z
        grad_xs = torch.zeros_like(x)
        for n0, n1, signs in _sign_tiles(data, ctx.k):
            grad_xs.addmm_(grad_z[:, n0:n1], signs)
        grad_s_in_rows = grad_xs * x
        grad_gates = grad_s_in_rows @ s_in.T + grad_s_out_rows @ s_out.T
        grad_logits = gates * (grad_gates - (grad_gates * gates).sum(dim=-1, keepdim=True))
        want_x, want_router, want_s_in, want_s_out = ctx.needs_input_grad[:4]
        grad_x = grad_xs * (gates @ s_in) + grad_logits @ router if want_x else None
        return (grad_x, grad_logits.T @ x if want_router else None, gates.T @ grad_s_in_rows if want_s_in else None,
                gates.T @ grad_s_out_rows if want_s_out else None, None, None)


def matmul(x: torch.Tensor, packed: PackedSigns, experts: Any, router: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """y (..., N) = ((x * (g @ s_in)) @ B.T) * (g @ s_out) + bias with g = softmax(x @ router.T), x (..., K)."""
    n, k = packed.shape
    y = _MoSProduct.apply(x.reshape(-1, k).float(), router.float(), experts.s_in.float(), experts.s_out.float(),
                          packed.data, k)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def supports(x: Any, packed: PackedSigns, experts: Any, router: Any, bias: Any) -> tuple[bool, str]:
    if not arrays.is_torch(x):
        return False, f"the torch backend takes torch tensors, got {type(x).__name__}; use torch.from_numpy"
    return True, ""


def product_dtype(x_dtype: str) -> str:
    return "float32"
