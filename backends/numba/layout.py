"""The lookup kernels' weight layout, derived from format v1 once per packed weight and cached in memory.

Row block b holds rows ``lanes * b .. lanes * b + lanes - 1`` (zero rows past N) and is stored byte column by
byte column: ``blocks[b, lanes * j + r] = data[lanes * b + r, j]``. It is the same bytes as the packed signs
(plus up to lanes - 1 padding rows), transposed within each block, so one vector load gives the 4-bit codes of
``lanes`` rows for two groups of inputs. It is never written to disk.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

_cache: dict[tuple[int, int], tuple[weakref.ref, np.ndarray]] = {}


def row_blocks(data: np.ndarray, lanes: int) -> np.ndarray:
    """(Np / lanes, Kp / 8 * lanes) uint8 blocks of ``data`` (N, Kp / 8) uint8, Np = lanes * ceil(N / lanes)."""
    n, kbytes = data.shape
    padded = np.zeros((-(-n // lanes) * lanes, kbytes), dtype=np.uint8)
    padded[:n] = data
    blocks = padded.reshape(-1, lanes, kbytes).transpose(0, 2, 1)
    return np.ascontiguousarray(blocks).reshape(-1, kbytes * lanes)


def cached_row_blocks(owner: Any, data: np.ndarray, lanes: int) -> np.ndarray:
    """`row_blocks`, computed once per ``owner`` (the packed data object, NumPy or torch) and lane width.

    The entry lives as long as ``owner``; packed data is treated as immutable, as PackedSigns is frozen.
    """
    key = (id(owner), lanes)
    entry = _cache.get(key)
    if entry is not None and entry[0]() is owner:
        return entry[1]
    blocks = row_blocks(data, lanes)
    _cache[key] = (weakref.ref(owner, lambda _, key=key: _cache.pop(key, None)), blocks)
    return blocks
