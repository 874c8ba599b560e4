"""A packed layer's inference as one torch operator, ``torch.ops.mosbits.packed_linear``, for graphs.

Eagerly, `mosbits.hf.PackedMoSLinear` runs its prepared layer: Python that ``torch.compile`` cannot trace (it
would trace into numba's dispatcher and fail) and that ``torch.jit.trace`` would record as a constant (the output
of the traced call, whatever the later inputs). Under either, the layer calls this operator instead: the graph
holds one opaque node per layer, and at run time the node does what ``mosbits.matmul`` does eagerly (checks the
arguments, takes the best installed backend for their device: numba on the CPU, Triton on CUDA). A fake
implementation gives torch the output's shape and dtype. No autograd formula: train through the torch backend
(`mosbits.hf.trainable_scales`).
"""

import torch

import mosbits
from mosbits.format import PackedSigns


@torch.library.custom_op("mosbits::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, signs: torch.Tensor, in_features: int, s_in: torch.Tensor, s_out: torch.Tensor,
                  router: torch.Tensor, bias: torch.Tensor | None, precision: str) -> torch.Tensor:
    """y (..., N) in x's dtype for x (..., K): signs (N, 4 * ceil(K / 32)) uint8 in format v1, s_in (E, K),
    s_out (E, N), router (E, K) (a zero (1, K) row for E = 1), bias (N,) or None; ``precision`` as for
    ``mosbits.matmul``."""
    packed = PackedSigns(signs, (signs.shape[0], in_features))
    return mosbits.matmul(x, packed, mosbits.Experts(s_in, s_out), router, bias=bias, precision=precision)


@packed_linear.register_fake
def _(x: torch.Tensor, signs: torch.Tensor, in_features: int, s_in: torch.Tensor, s_out: torch.Tensor,
      router: torch.Tensor, bias: torch.Tensor | None, precision: str) -> torch.Tensor:
    torch._check(x.shape[-1] == in_features, lambda: f"x must have shape (..., {in_features}), got {x.shape}")
    return x.new_empty((*x.shape[:-1], signs.shape[0]))
