"""``mosbits.matmul``: validate, pick a backend, call it. The only door into the kernels."""

from __future__ import annotations

from typing import Any

from mosbits import arrays, dispatch
from mosbits import precision as precisions
from mosbits.experts import Experts
from mosbits.format import PackedSigns


def matmul(
    x: Any,
    packed: PackedSigns,
    experts: Experts,
    router: Any,
    *,
    bias: Any = None,
    backend: str = "auto",
    precision: str = "exact",
) -> Any:
    """One BinaryMoS linear layer.

    For each token x (a row of length K)::

        g = softmax(x @ router.T)                       # (E,), in float32
        y = ((x * (g @ s_in)) @ B.T) * (g @ s_out) + bias

    Args:
        x: (..., K) float16, bfloat16 (torch only) or float32 activations, NumPy or torch; any number of
            leading dims, including zero-size ones.
        packed: the signs B, shape (N, K).
        experts: s_in (E, K) and s_out (E, N), x's dtype.
        router: (E, K) router weight (nn.Linear(K, E) layout), x's dtype.
        bias: optional (N,), x's dtype.
        backend: ``"auto"`` or a registered name (`mosbits.backends.available()`). An explicit name never
            falls back to another backend.
        precision: ``"exact"`` (float32, within the reference tolerance) or ``"fast"`` (int8 table lookups,
            numba backend only; its error bound is in `mosbits.precision`).

    Returns:
        y: (..., N) with x's array type, device and dtype. Softmax and accumulation run in at least float32.

    Raises:
        TypeError: an argument has the wrong type or dtype (the message says what to cast).
        ValueError: shapes or devices disagree, or the backend cannot run the call (with its reason).
        BackendUnavailableError: the explicit backend is not installed.
    """
    precisions.check(precision)
    check_args(x, packed, experts, router, bias)
    module = dispatch.select(backend, x, packed, experts, router, bias, precision)
    return getattr(module, precisions.PRECISIONS[precision])(x, packed, experts, router, bias)


def check_args(x: Any, packed: Any, experts: Any, router: Any, bias: Any) -> None:
    """Raise a TypeError or ValueError naming the first argument that does not fit the layer."""
    check_layer(packed, experts, router, bias)
    try:
        arrays.array_kind(x)
    except TypeError as err:
        raise TypeError(f"x: {err}") from None
    k = packed.shape[1]
    x_dtype, layer_dtype = arrays.dtype_name(x), arrays.dtype_name(experts.s_in)
    if x_dtype not in arrays.FLOAT_DTYPES:
        raise TypeError(f"x must be one of {', '.join(arrays.FLOAT_DTYPES)}, got {x_dtype}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., K) with K = {k} (packed.shape = {packed.shape}), "
                         f"got {tuple(x.shape)}")
    if x_dtype != layer_dtype:
        raise TypeError(f"x has dtype {x_dtype} but the layer (experts, router, bias) has dtype {layer_dtype}: "
                        f"cast x to {layer_dtype} (or the layer's float parameters to {x_dtype})")
    if arrays.library(x) != arrays.library(packed.data):
        raise TypeError(f"x is a {arrays.library(x)} array but the layer holds {arrays.library(packed.data)} "
                        "arrays: use one library")
    if arrays.device_of(x) != arrays.device_of(packed.data):
        raise ValueError(f"x is on device {arrays.device_of(x)} but the layer is on "
                         f"{arrays.device_of(packed.data)}: move x with .to({arrays.device_of(packed.data)!r})")


def check_layer(packed: Any, experts: Any, router: Any, bias: Any) -> None:
    """Check that the weights of one layer agree in shape, dtype, library and device.

    Shapes: packed (N, K), experts.s_in (E, K), experts.s_out (E, N), router (E, K), bias (N,) or None.
    experts' dtype is the layer's; router and bias must share it.
    """
    if not isinstance(packed, PackedSigns):
        raise TypeError(f"packed must be mosbits.PackedSigns (from mosbits.pack), got {type(packed).__name__}")
    if not isinstance(experts, Experts):
        raise TypeError(f"experts must be mosbits.Experts(s_in, s_out), got {type(experts).__name__}")
    params = {"router": router} if bias is None else {"router": router, "bias": bias}
    for name, a in params.items():
        try:
            arrays.array_kind(a)
        except TypeError as err:
            raise TypeError(f"{name}: {err}") from None

    n, k = packed.shape
    e = experts.num_experts
    if experts.in_features != k:
        raise ValueError(f"experts.s_in must have shape (E, K) = ({e}, {k}), got {tuple(experts.s_in.shape)}")
    if experts.out_features != n:
        raise ValueError(f"experts.s_out must have shape (E, N) = ({e}, {n}), got {tuple(experts.s_out.shape)}")
    if router.ndim != 2 or tuple(router.shape) != (e, k):
        raise ValueError(f"router must have shape (E, K) = ({e}, {k}) (nn.Linear(K, E).weight), "
                         f"got {tuple(router.shape)}")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must have shape (N,) = ({n},), got {tuple(bias.shape)}")

    layer_dtype = arrays.dtype_name(experts.s_in)
    for name, a in params.items():
        if arrays.dtype_name(a) != layer_dtype:
            raise TypeError(f"{name} has dtype {arrays.dtype_name(a)} but experts have dtype {layer_dtype}: "
                            f"cast {name} to {layer_dtype}")
    lib, device = arrays.library(experts.s_in), arrays.device_of(experts.s_in)
    for name, a in {"packed.data": packed.data, **params}.items():
        if arrays.library(a) != lib:
            raise TypeError(f"{name} is a {arrays.library(a)} array but experts are {lib} arrays: use one library")
        if arrays.device_of(a) != device:
            raise ValueError(f"{name} is on device {arrays.device_of(a)} but experts are on {device}: "
                             f"move it with .to({device!r})")
