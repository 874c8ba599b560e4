"""The lookup kernels' weight layout, derived from format v1 when a layer is prepared and kept by that layer.

Row block b holds rows ``lanes * b .. lanes * b + lanes - 1`` (zero rows past N) and is stored byte column by
byte column: ``blocks[b, lanes * j + r] = data[lanes * b + r, j]``. It is the same bytes as the packed signs
(plus up to lanes - 1 padding rows), transposed within each block, so one vector load gives the 4-bit codes of
``lanes`` rows for two groups of inputs. It is never written to disk, and never cached beyond the
`mosbits.backends.numba.NumbaLayer` that derived it: a layer whose signs change is prepared again (as
``PackedMoSLinear`` does when its buffers change), so no layout can outlive the bits it came from.
"""

from __future__ import annotations

import numpy as np

from mosbits.backends.numba import _kernels


def row_blocks(data: np.ndarray, lanes: int) -> np.ndarray:
    """(Np / lanes, Kp / 8 * lanes) uint8 blocks of ``data`` (N, Kp / 8) uint8, Np = lanes * ceil(N / lanes)."""
    n, kbytes = data.shape
    blocks = np.empty((-(-n // lanes), kbytes * lanes), dtype=np.uint8)
    _kernels.row_blocks(np.ascontiguousarray(data), lanes, blocks)
    return blocks
