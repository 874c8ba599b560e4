"""The forward as the torch operator ``torch.ops.mosbits.mos_matmul``, so that torch.compile traces through it
(with `register_fake` giving the output's shape and dtype) and CUDA graphs capture its launches.

No autograd formula is registered: the Triton path is for inference; train through the torch backend.
"""

import torch

from mosbits.backends.triton import _host


@torch.library.custom_op("mosbits::mos_matmul", mutates_args=())
def mos_matmul(x: torch.Tensor, signs: torch.Tensor, in_features: int, s_in: torch.Tensor, s_out: torch.Tensor,
               router: torch.Tensor, bias: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
    """y (..., N) from x (..., K), format-v1 signs (N, 4 * ceil(K / 32)) uint8, s_in (E, K), s_out (E, N),
    router (E, K), optional bias (N,); ``path`` is "auto", "gemv" or "gemm". See `_host.mos_matmul`."""
    return _host.mos_matmul(x, signs, in_features, s_in, s_out, router, bias, path)


@mos_matmul.register_fake
def _(x: torch.Tensor, signs: torch.Tensor, in_features: int, s_in: torch.Tensor, s_out: torch.Tensor,
      router: torch.Tensor, bias: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
    torch._check(x.shape[-1] == in_features, lambda: f"x must have shape (..., {in_features}), got {x.shape}")
    return x.new_empty((*x.shape[:-1], signs.shape[0]))
