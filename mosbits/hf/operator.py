"""A packed layer's inference as one torch operator, ``torch.ops.mosbits.packed_linear``, for graphs.

Eagerly, `mosbits.hf.PackedMoSLinear` runs its prepared layer: Python that ``torch.compile`` cannot trace (it
would trace into numba's dispatcher and fail) and that ``torch.jit.trace`` would record as a constant (the output
of the traced call, whatever the later inputs). Under either, the layer calls this operator instead: the graph
holds one opaque node per layer. At run time the node finds the live layer whose buffers it was given (the same
memory, shape, dtype and strides: the lookup is by the signs' address, then checked tensor by tensor) and runs
that layer's prepared layer, as the eager forward does, rebuilt when a buffer changes; for tensors that are no
live layer's buffers (a graph run after its model is gone, or a direct call) it does what ``mosbits.matmul``
does eagerly (checks the arguments, takes the best installed backend for their device), twice as slow per
token on SmolLM2. A fake implementation gives torch the output's shape and dtype. No autograd formula: train
through the torch backend (`mosbits.hf.trainable_scales`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

import mosbits
from mosbits.format import PackedSigns

_LAYERS: weakref.WeakSet[Any] = weakref.WeakSet()
"""Every live `mosbits.hf.PackedMoSLinear` (added by `track`)."""

_BY_SIGNS: dict[int, weakref.ref[Any]] = {}
"""The address of a live layer's signs -> the layer, rebuilt from `_LAYERS` when a look-up misses."""


def track(layer: Any) -> None:
    """Make ``layer`` (a `mosbits.hf.PackedMoSLinear`) findable by the operator."""
    _LAYERS.add(layer)


def _prepared_for(signs: torch.Tensor, *tensors: Any) -> mosbits.PreparedLayer | None:
    """The prepared layer of the live layer whose buffers ``signs`` and ``tensors`` are (`PackedMoSLinear.serves`),
    or None."""
    layer = _layer_at(signs)
    if layer is None or not layer.serves(signs, *tensors):
        _BY_SIGNS.clear()
        _BY_SIGNS.update((live.signs.data_ptr(), weakref.ref(live)) for live in list(_LAYERS))
        layer = _layer_at(signs)
    return layer.prepared() if layer is not None and layer.serves(signs, *tensors) else None


def _layer_at(signs: torch.Tensor) -> Any:
    """The live layer `_BY_SIGNS` holds at the address of ``signs``, or None."""
    ref = _BY_SIGNS.get(signs.data_ptr())
    return ref() if ref is not None else None


@torch.library.custom_op("mosbits::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, signs: torch.Tensor, in_features: int, s_in: torch.Tensor, s_out: torch.Tensor,
                  router: torch.Tensor, bias: torch.Tensor | None, precision: str) -> torch.Tensor:
    """y (..., N) in x's dtype for x (..., K): signs (N, 4 * ceil(K / 32)) uint8 in format v1, s_in (E, K),
    s_out (E, N), router (E, K) (a zero (1, K) row for E = 1), bias (N,) or None; ``precision`` as for
    ``mosbits.matmul``."""
    prepared = _prepared_for(signs, in_features, s_in, s_out, router, bias, precision)
    if prepared is not None:
        return prepared(x)
    packed = PackedSigns(signs, (signs.shape[0], in_features))
    return mosbits.matmul(x, packed, mosbits.Experts(s_in, s_out), router, bias=bias, precision=precision)


@packed_linear.register_fake
def _(x: torch.Tensor, signs: torch.Tensor, in_features: int, s_in: torch.Tensor, s_out: torch.Tensor,
      router: torch.Tensor, bias: torch.Tensor | None, precision: str) -> torch.Tensor:
    torch._check(x.shape[-1] == in_features, lambda: f"x must have shape (..., {in_features}), got {x.shape}")
    return x.new_empty((*x.shape[:-1], signs.shape[0]))
