"""Layers validated once and bound to one backend and precision, for calling many times.

``mosbits.matmul`` checks every argument and picks a backend on every call: a few microseconds each time,
which matters at batch 1, where a layer takes about 0.1 ms. `prepare` does that work once:

    layer = mosbits.prepare(packed, experts, router, bias, backend="numba")
    y = layer(x)            # checks only x

Backends derive what they need at preparation (the numba backend: float32 copies of half-precision parameters
and its row-block layout of the signs, about 0.25 ms at 4096 x 4096 here) and keep it in the prepared layer
only, never in a cache keyed on the arrays: a plain ``mosbits.matmul`` derives it anew on every call, so it always
sees the arrays as they are, and a prepared layer sees them as they were when prepared. Prepare again after
changing the layer's weights (`mosbits.hf.PackedMoSLinear` does so by itself).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from mosbits import arrays, dispatch
from mosbits import precision as precisions
from mosbits.api import check_args, check_layer
from mosbits.experts import Experts
from mosbits.format import PackedSigns


class PreparedLayer:
    """One layer bound to a backend and precision (see `prepare`); ``layer(x)`` is
    ``mosbits.matmul(x, packed, experts, router, bias=bias, backend=..., precision=...)``.

    Attributes:
        backend: the backend's name (``"auto"`` resolved at preparation).
        precision: ``"exact"`` or ``"fast"``.
        shape: (N, K).
    """

    def __init__(self, packed: PackedSigns, experts: Experts, router: Any, bias: Any, backend: str,
                 precision: str) -> None:
        self.precision = precisions.check(precision)
        check_layer(packed, experts, router, bias)
        self._args = (packed, experts, router, bias)
        self.shape = packed.shape
        s_in = experts.s_in
        probe = s_in.new_zeros((1, packed.shape[1])) if arrays.is_torch(s_in) else np.zeros((1, packed.shape[1]),
                                                                                            s_in.dtype)
        self._module = dispatch.select(backend, probe, *self._args, self.precision)
        self.backend = next(name for name, spec in dispatch.BACKENDS.items()
                            if spec.module == self._module.__name__)
        if hasattr(self._module, "prepare"):
            self._run = self._module.prepare(*self._args, self.precision)
        else:
            function = getattr(self._module, precisions.PRECISIONS[self.precision])
            self._run = lambda x: function(x, *self._args)
        self._x_type, self._x_dtype, self._k = type(probe), probe.dtype, packed.shape[1]
        self._x_device = probe.device if arrays.is_torch(probe) else None
        self._recording = sys.modules["torch"].is_grad_enabled if arrays.is_torch(probe) else bool

    def fits(self, x: Any) -> bool:
        """True when x is like the input the backend was chosen for: same library, dtype and device, (..., K),
        and for torch with autograd off (the backend's ``supports`` already accepted such an input)."""
        return (type(x) is self._x_type and x.dtype == self._x_dtype and x.ndim >= 1 and x.shape[-1] == self._k
                and (self._x_device is None or (x.device == self._x_device and not self._recording())))

    def __call__(self, x: Any) -> Any:
        """x (..., K) -> y (..., N), x of the layer's library, device and dtype.

        An input that `fits` goes straight to the backend; any other is checked in full first."""
        if self.fits(x):
            return self._run(x)
        check_args(x, *self._args)
        ok, reason = self._module.supports(x, *self._args)
        if not ok:
            raise ValueError(f"backend {self.backend!r} cannot run this call: {reason}")
        return self._run(x)

    def __repr__(self) -> str:
        n, k = self.shape
        return f"PreparedLayer(N={n}, K={k}, backend={self.backend!r}, precision={self.precision!r})"


class PreparedGroup:
    """Prepared layers that read the same input (q, k and v of an attention; gate and up of an MLP), called
    together: ``group(x)`` returns ``[layer(x) for layer in layers]``, bit for bit, from one backend call where
    the backend serves groups (numba: one compiled call per input; elsewhere, one call per layer).

    Attributes:
        layers: the `PreparedLayer`s, in order.
    """

    def __init__(self, layers: list[PreparedLayer]) -> None:
        if not layers or not all(isinstance(layer, PreparedLayer) for layer in layers):
            raise TypeError(f"layers must be a non-empty list of PreparedLayer, got {layers!r}")
        self.layers = list(layers)
        lead = self.layers[0]

        def kind(layer: PreparedLayer) -> tuple[Any, ...]:
            return layer._module, layer.precision, layer._k, layer._x_type, layer._x_dtype, layer._x_device

        for layer in self.layers[1:]:
            if kind(layer) != kind(lead):
                raise ValueError(f"a group's layers must share backend, precision, K and input kind: {layer!r} "
                                 f"({layer._x_dtype}) differs from {lead!r} ({lead._x_dtype})")
        if hasattr(lead._module, "prepare_group"):
            self._run = lead._module.prepare_group([layer._run for layer in self.layers])
        else:
            self._run = lambda x: [layer._run(x) for layer in self.layers]

    def __call__(self, x: Any) -> list[Any]:
        """x (..., K) -> [y_i (..., N_i)]: one output per layer."""
        if self.layers[0].fits(x):
            return self._run(x)
        return [layer(x) for layer in self.layers]

    def __repr__(self) -> str:
        return f"PreparedGroup({self.layers!r})"


def prepare_group(layers: list[PreparedLayer]) -> PreparedGroup:
    """Serve layers that read the same input from one call: ``prepare_group([prepare(...), ...])(x)`` returns
    each layer's output for x, bit for bit as its own call would.

    Raises:
        TypeError: ``layers`` is empty or holds something other than `PreparedLayer`.
        ValueError: the layers differ in backend, precision, K or the input they were prepared for.
    """
    return PreparedGroup(layers)


def prepare(packed: PackedSigns, experts: Experts, router: Any, bias: Any = None, *, backend: str = "auto",
            precision: str = "exact") -> PreparedLayer:
    """Validate a layer once and bind it to a backend and precision.

    Args: as `mosbits.matmul`, without x. ``backend="auto"`` is resolved here, for an input of the layer's
    library, device and dtype that needs no gradient; a later call the chosen backend cannot run raises
    instead of switching backends.

    Returns:
        A `PreparedLayer`: ``layer(x)`` with x (..., K) returns y (..., N).

    Raises:
        as `mosbits.matmul`.
    """
    return PreparedLayer(packed, experts, router, bias, backend, precision)
