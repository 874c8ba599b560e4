"""Array-library helpers that never import torch.

mosbits accepts NumPy arrays and torch tensors. The core must not import torch, so torch tensors are recognised
through ``sys.modules``: if torch was never imported, no argument can be a tensor.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
"""Activation and parameter dtypes that ``mosbits.matmul`` accepts."""

_poison_outputs = False


def is_torch(a: Any) -> bool:
    """True when ``a`` is a ``torch.Tensor`` (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def array_kind(a: Any) -> str:
    """``"numpy"`` for an ndarray, ``"torch-<device type>"`` (e.g. ``"torch-cpu"``) for a tensor.

    Raises:
        TypeError: ``a`` is neither.
    """
    if isinstance(a, np.ndarray):
        return "numpy"
    if is_torch(a):
        return f"torch-{a.device.type}"
    raise TypeError(f"expected a numpy.ndarray or torch.Tensor, got {type(a).__name__}")


def library(a: Any) -> str:
    """``"numpy"`` or ``"torch"``."""
    return array_kind(a).split("-")[0]


@functools.cache
def _name_of(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.") if "torch" in str(type(dtype)) else np.dtype(dtype).name


def dtype_name(a: Any) -> str:
    """The dtype as a plain name, the same for both libraries: ``"float32"``, ``"bfloat16"``, ``"uint8"``...

    Cached per dtype object: NumPy computes ``dtype.name`` anew on every access, which cost a quarter of a
    decode-sized call's Python overhead."""
    return _name_of(a.dtype)


def is_float_dtype(a: Any) -> bool:
    if is_torch(a):
        return a.dtype.is_floating_point
    return np.issubdtype(a.dtype, np.floating)


def nbytes(a: Any) -> int:
    """Bytes held by the array's elements."""
    return int(a.numel() * a.element_size()) if is_torch(a) else int(a.nbytes)


def device_of(a: Any) -> str:
    """``"cpu"`` for NumPy; the torch device as a string (``"cuda:0"``) for tensors."""
    return str(a.device) if is_torch(a) else "cpu"


def from_numpy(a: np.ndarray, library: str, dtype: str | None = None, device: str = "cpu") -> Any:
    """A NumPy array on ``library`` ("numpy" or "torch") and ``device``, cast to ``dtype`` (None keeps it).

    torch is imported only when asked for."""
    if library == "numpy":
        return a if dtype is None else a.astype(dtype)
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return t if dtype is None else t.to(getattr(torch, dtype))


def empty(like: Any, shape: tuple[int, ...], dtype: Any = None) -> Any:
    """An uninitialised output array on ``like``'s library and device (``dtype`` defaults to ``like``'s).

    Backends allocate their outputs and scratch tiles here, so that tests can poison them (see
    `poisoned_outputs`: floats with NaN, integers with every bit set, which for the 16-bit patterns of bfloat16 is
    a NaN too) and an element a kernel forgot to write fails loudly instead of holding stale memory that happens
    to look right.
    """
    if is_torch(like):
        out = like.new_empty(shape, dtype=like.dtype if dtype is None else dtype)
        if _poison_outputs:
            out.fill_(float("nan") if out.is_floating_point() else -1)
        return out
    out = np.empty(shape, dtype=like.dtype if dtype is None else dtype)
    if _poison_outputs:
        if np.issubdtype(out.dtype, np.floating):
            out.fill(np.nan)
        else:
            out.view(np.uint8).fill(0xFF)
    return out


def poisoning() -> bool:
    """True within `poisoned_outputs`: backends that allocate scratch arrays inside compiled code (the numba
    kernels' gates and tables) poison those too."""
    return _poison_outputs


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within the block, every array from `empty` starts poisoned (NaN, or every bit set) (for tests)."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, True
    try:
        yield
    finally:
        _poison_outputs = previous
