"""A packed layer's inference as one torch operator, ``torch.ops.mosbits.packed_linear``, for graphs.

Eagerly, `mosbits.hf.PackedMoSLinear` runs its prepared layer: Python that ``torch.compile`` cannot trace (it
would trace into numba's dispatcher and fail) and that ``torch.jit.trace`` would record as a constant (the output
of the traced call, whatever the later inputs). Under either, the layer calls this operator instead: the graph
holds one opaque node per layer. At run time the node finds the live layer whose buffers it was given (the same
memory, shape, dtype and strides: the lookup is by the signs' address, then checked tensor by tensor) and serves
it as the eager forward does (`PackedMoSLinear.infer`: its prepared layer, rebuilt when a buffer changes, or one
call for the layers that read the same input, `mosbits.hf.fusion`); for tensors that are no
live layer's buffers (a graph run after its model is gone, or a direct call) it does what ``mosbits.matmul``
does eagerly (checks the arguments, takes the best installed backend for their device), twice as slow per
token on SmolLM2. A fake implementation gives torch the output's shape and dtype. No autograd formula: train
through the torch backend (`mosbits.hf.trainable_scales`).

``torch.ops.mosbits.dense_linear`` does the same for the dense linears a packed model keeps
(`mosbits.hf.DecodeLinear`, its lm_head): under ``torch.compile`` the graph holds one node that runs
`dense_linear`, which serves a token or two with the numba backend's dense kernel as the eager layer does (inductor
would otherwise compile the head to torch's matrix product, about three times slower at batch 1 on SmolLM2), so a
compiled model's decode logits are the eager model's, bit for bit.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F

import mosbits
from mosbits import dispatch
from mosbits.format import PackedSigns

_LAYERS: weakref.WeakSet[Any] = weakref.WeakSet()
"""Every live `mosbits.hf.PackedMoSLinear` (added by `track`)."""

_BY_SIGNS: dict[int, weakref.ref[Any]] = {}
"""The address of a live layer's signs -> the layer, rebuilt from `_LAYERS` when a look-up misses."""


def track(layer: Any) -> None:
    """Make ``layer`` (a `mosbits.hf.PackedMoSLinear`) findable by the operator."""
    _LAYERS.add(layer)


def _layer_for(signs: torch.Tensor, *tensors: Any) -> Any:
    """The live layer whose buffers ``signs`` and ``tensors`` are (`PackedMoSLinear.serves`), or None."""
    layer = _layer_at(signs)
    if layer is not None and layer.serves(signs, *tensors):
        return layer
    _BY_SIGNS.clear()
    _BY_SIGNS.update((live.signs.data_ptr(), weakref.ref(live)) for live in list(_LAYERS))
    layer = _layer_at(signs)
    return layer if layer is not None and layer.serves(signs, *tensors) else None


def _layer_at(signs: torch.Tensor) -> Any:
    """The live layer `_BY_SIGNS` holds at the address of ``signs``, or None."""
    ref = _BY_SIGNS.get(signs.data_ptr())
    return ref() if ref is not None else None


_LIBRARY = torch.library.Library("mosbits", "FRAGMENT")
"""The operators below, registered for every device as plain kernels ("CompositeExplicitAutograd"): a call costs
about 3 us, against about 10 us through ``torch.library.custom_op``'s Python wrappers (one call per packed layer
per token). They have no autograd formula: the layers call them only where no gradient is wanted."""
_LIBRARY.define("packed_linear(Tensor x, Tensor signs, int in_features, Tensor s_in, Tensor s_out, Tensor router, "
                "Tensor? bias, str precision) -> Tensor")
_LIBRARY.define("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _packed_linear(x: torch.Tensor, signs: torch.Tensor, in_features: int, s_in: torch.Tensor, s_out: torch.Tensor,
                   router: torch.Tensor, bias: torch.Tensor | None, precision: str) -> torch.Tensor:
    """y (..., N) in x's dtype for x (..., K): signs (N, 4 * ceil(K / 32)) uint8 in format v1, s_in (E, K),
    s_out (E, N), router (E, K) (a zero (1, K) row for E = 1), bias (N,) or None; ``precision`` as for
    ``mosbits.matmul``."""
    layer = _layer_for(signs, in_features, s_in, s_out, router, bias, precision)
    if layer is not None:
        return layer.infer(x, x)
    packed = PackedSigns(signs, (signs.shape[0], in_features))
    return mosbits.matmul(x, packed, mosbits.Experts(s_in, s_out), router, bias=bias, precision=precision)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (V, K), bias (V,) or None -> (..., V), computed by the
    numba backend's dense kernel where it serves the call (`mosbits.backends.numba.dense_refusal`: a token or
    two on the CPU, bfloat16 or float32, no gradient) and ``MOSBITS_BACKEND`` allows numba, else by torch."""
    backend = _numba_backend()
    if (backend is not None and os.environ.get(dispatch.ENV_VAR, "numba") in ("numba", "auto")
            and not backend.dense_refusal(x, weight, bias)):
        return backend.run_dense(x, weight, bias)
    return F.linear(x, weight, bias)


@functools.cache
def _numba_backend() -> Any:
    """The numba backend's module, or None where numba is not installed; looked up on the first `dense_linear`
    call (not when a model is built), then kept: the look-up imports and searches packages."""
    return dispatch.load("numba") if dispatch.spec("numba").is_installed() else None


def _packed_linear_shape(x: torch.Tensor, signs: torch.Tensor, in_features: int, s_in: torch.Tensor,
                         s_out: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None,
                         precision: str) -> torch.Tensor:
    torch._check(x.shape[-1] == in_features, lambda: f"x must have shape (..., {in_features}), got {x.shape}")
    return x.new_empty((*x.shape[:-1], signs.shape[0]))


def _dense_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"x must have shape (..., {weight.shape[1]}), got {x.shape}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_LIBRARY.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")
_LIBRARY.impl("dense_linear", dense_linear, "CompositeExplicitAutograd")
torch.library.register_fake("mosbits::packed_linear", _packed_linear_shape, lib=_LIBRARY)
torch.library.register_fake("mosbits::dense_linear", _dense_linear_shape, lib=_LIBRARY)
packed_linear = torch.ops.mosbits.packed_linear.default
"""The operator (`_packed_linear` is what it runs)."""
