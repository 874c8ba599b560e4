"""The Triton backend: the BinaryMoS layer as fused GPU kernels on packed signs.

Per call: a small kernel computes the gates g = softmax(x @ router.T) (M, E) in float32; then one matmul kernel
scales x by g @ s_in while loading it, multiplies by the packed signs, and applies g @ s_out and the bias in its
epilogue. Nothing of size M x K or M x N is allocated besides the output (and a copy of x when it cannot be
viewed as (M, K) rows of unit column stride). Two matmul paths (`_host.choose_path`):

- GEMV, for M <= `_host.GEMV_MAX_M`: each program owns one token and a block of output rows, walks all of K
  and XORs the sign bits into the float32 activations (no atomics: bitwise deterministic).
- GEMM, above: tiles of B are decoded to x's dtype and multiplied with `tl.dot` into a float32 accumulator.
  ``x * s_in`` is rounded to x's dtype first, which `product_dtype` reports.

``path="gemv"|"gemm"`` on `matmul` or ``MOSBITS_TRITON_PATH=gemv|gemm`` forces a path (tests run both).

A prepared layer (`prepare`, what `mosbits.prepare` and the packed models' layers use) launches the kernels
straight from Python: the operator's dispatch and argument checks cost more host time than the kernels take at
batch 1 (an eager call on an H200 took 0.16-0.65 ms against 17-42 us of kernels; README "On a GPU"). Under
``torch.compile`` and ``torch.jit.trace`` it calls the operator, so that the graph records it.

Devices: CUDA tensors in float16, bfloat16 and float32. CPU tensors run in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before this module was imported (float32 and float16 only: the interpreter has
no bfloat16 arithmetic). The forward is the torch operator ``torch.ops.mosbits.mos_matmul`` (with a fake
implementation, for torch.compile and CUDA graphs; warm it up before capturing a graph so that autotuning has
run). It has no autograd formula: `supports` declines calls on tensors that require grad (train through the
torch backend), and a backward through the operator itself raises a RuntimeError.

Tests: ``TRITON_INTERPRET=1 MOSBITS_TEST_BACKENDS=triton python -m pytest -q`` on a CPU (``nox -s "tests(triton)"``);
on a GPU: ``MOSBITS_TEST_BACKENDS=triton MOSBITS_TEST_DEVICE=cuda python -m pytest -q``, several times faster with
``MOSBITS_TRITON_AUTOTUNE=0`` (one config per kernel; a test still runs every config on its own).
"""

from __future__ import annotations

from typing import Any

import torch

from mosbits import arrays
from mosbits.backends.triton import _host, _kernels, _op
from mosbits.backends.triton._host import PATH_ENV, choose_path
from mosbits.format import PackedSigns

__all__ = ["PATH_ENV", "TritonLayer", "choose_path", "matmul", "prepare", "product_dtype", "supports"]


def supports(x: Any, packed: PackedSigns, experts: Any, router: Any, bias: Any) -> tuple[bool, str]:
    """Torch CUDA tensors; torch CPU tensors in float32 or float16 under ``TRITON_INTERPRET=1``; never a call
    that autograd records (so that ``backend="auto"`` gives it to the differentiable torch backend)."""
    if not arrays.is_torch(x):
        return False, f"the triton backend takes torch tensors, got {type(x).__name__}; use torch.from_numpy"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, experts.s_in, experts.s_out, router, bias)):
        return False, ("the triton backend has no autograd formula and an input requires grad: use "
                       "backend='torch' to train, or call under torch.no_grad() / torch.inference_mode()")
    if x.device.type == "cuda":
        return True, ""
    if x.device.type == "cpu" and _kernels.INTERPRET:
        if x.dtype == torch.bfloat16:
            return False, "bfloat16 needs a GPU: the Triton interpreter has no bfloat16 arithmetic"
        return True, ""
    return False, (f"the triton backend runs CUDA tensors, got a {x.device.type} tensor: move the layer and x to "
                   "'cuda', or set TRITON_INTERPRET=1 before importing mosbits.backends.triton to run Triton's "
                   "CPU interpreter (slow, for tests)")


def matmul(x: torch.Tensor, packed: PackedSigns, experts: Any, router: torch.Tensor, bias: torch.Tensor | None,
           *, path: str = "auto") -> torch.Tensor:
    """y (..., N) = ((x * (g @ s_in)) @ B.T) * (g @ s_out) + bias, g = softmax(x @ router.T), x (..., K).

    Args: as `mosbits.matmul` (already validated), plus ``path``: "auto", "gemv" or "gemm".
    """
    return _op.mos_matmul(x, packed.data, packed.shape[1], experts.s_in, experts.s_out, router, bias, path)


def prepare(packed: PackedSigns, experts: Any, router: torch.Tensor, bias: torch.Tensor | None,
            precision: str) -> TritonLayer:
    """The layer made ready for many calls (`mosbits.prepared`; precision is "exact", the only one here)."""
    return TritonLayer(packed, experts, router, bias)


class TritonLayer:
    """A layer's tensors, contiguous, with the signs viewed as int32 words, held for many calls; ``layer(x)``
    with x (..., K) of the layer's dtype and device returns y (..., N) as `matmul` does, bit for bit.

    The call launches the kernels (`_host.launch`) without the operator's dispatch and checks: its caller,
    `mosbits.PreparedLayer`, has checked x. While torch.compile or torch.jit.trace records, the call goes
    through ``torch.ops.mosbits.mos_matmul`` instead, so that the recorded graph holds the operator."""

    def __init__(self, packed: PackedSigns, experts: Any, router: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.k = packed.shape[1]
        self.signs = packed.data.contiguous()
        self.words = self.signs.view(torch.int32)
        self.s_in, self.s_out = experts.s_in.contiguous(), experts.s_out.contiguous()
        self.router = router.contiguous()
        self.bias = None if bias is None else bias.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return _op.mos_matmul(x, self.signs, self.k, self.s_in, self.s_out, self.router, self.bias)
        return _host.launch(x, self.words, self.k, self.s_in, self.s_out, self.router, self.bias)


def product_dtype(x_dtype: str) -> str:
    """x's dtype: the GEMM path rounds x * s_in to it before `tl.dot` (float32 stays exact with "ieee" precision);
    the GEMV path keeps float32. The harness does not know M, so this is the coarser of the two."""
    if x_dtype not in arrays.FLOAT_DTYPES:
        raise ValueError(f"x_dtype must be one of {arrays.FLOAT_DTYPES}, got {x_dtype!r}")
    return x_dtype
