"""Packed sign format, version 1: the bit layout lives here and nowhere else.

Signs B (N x K) are bits packed along K, least significant bit first: weight (n, k) is bit ``k % 8`` of byte
``(n, k // 8)``. Bit 1 means +1 and bit 0 means -1, so a weight w packs as ``w >= 0`` (+0.0 and -0.0 both give
+1). Each row is padded with zero bits to a whole number of 32-bit words, so the data is uint8 of shape
``(N, 4 * ceil(K / 32))``; its little-endian int32 view ``(N, ceil(K / 32))`` holds the same bits. See
docs/FORMAT.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mosbits import arrays

FORMAT_VERSION = "1"
WORD_BITS = 32


def row_bytes(k: int) -> int:
    """Bytes per packed row for K inputs: ``4 * ceil(K / 32)``."""
    return 4 * -(-k // WORD_BITS)


@dataclasses.dataclass(frozen=True)
class PackedSigns:
    """A sign matrix B in {-1, +1}^(N x K), one bit per weight.

    Attributes:
        data: uint8 array (N, 4 * ceil(K / 32)), NumPy or torch on any device.
        shape: (N, K), the logical shape of B.

    Construction checks the structure (dtype, rank, row stride); `validate` also checks that the padding bits
    are zero, which reads the data.
    """

    data: Any
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"PackedSigns.shape must be (N, K) with N, K >= 1, got {self.shape}")
        object.__setattr__(self, "shape", shape)
        arrays.array_kind(self.data)
        n, k = shape
        if arrays.dtype_name(self.data) != "uint8":
            raise TypeError(f"PackedSigns.data must be uint8, got {arrays.dtype_name(self.data)}")
        expected = (n, row_bytes(k))
        if tuple(self.data.shape) != expected:
            raise ValueError(
                f"PackedSigns.data for shape (N, K) = {shape} must have shape {expected} "
                f"(rows padded to 32-bit words), got {tuple(self.data.shape)}"
            )

    @property
    def nbytes(self) -> int:
        """Bytes of packed data, padding included."""
        return self.data.shape[0] * self.data.shape[1]

    def validate(self) -> PackedSigns:
        """Check that every padding bit is zero; return self.

        Raises:
            ValueError: a padding bit is set (the buffer was not written by a v1 packer, or is corrupt).
        """
        k = self.shape[1]
        pad_mask = padding_mask(k)
        if not pad_mask.any():
            return self
        if arrays.is_torch(self.data):
            mask = self.data.new_tensor(pad_mask)
            bad_rows = ((self.data & mask) != 0).any(dim=1).nonzero().flatten().cpu().numpy()
        else:
            bad_rows = np.flatnonzero(((self.data & pad_mask) != 0).any(axis=1))
        if bad_rows.size:
            raise ValueError(
                f"PackedSigns for shape {self.shape}: padding bits after column K={k} must be 0, "
                f"found set bits in {bad_rows.size} row(s), first row {int(bad_rows[0])}"
            )
        return self

    def to(self, device: Any) -> PackedSigns:
        """The same signs with torch data moved to ``device``."""
        if not arrays.is_torch(self.data):
            raise TypeError("PackedSigns.to() needs torch data; NumPy data lives on the CPU")
        return PackedSigns(self.data.to(device), self.shape)


def padding_mask(k: int) -> np.ndarray:
    """uint8 (4 * ceil(K / 32),): the bits of a row that lie past column K."""
    bits = np.arange(row_bytes(k) * 8) >= k
    return np.packbits(bits, bitorder="little")


def pack(w: Any) -> PackedSigns:
    """Pack the signs of a latent weight.

    Args:
        w: (N, K) float array, NumPy or torch (any float dtype, any device), nn.Linear layout (out, in).

    Returns:
        PackedSigns whose data lives on w's library and device.

    Raises:
        TypeError: w is not a float array.
        ValueError: w is not 2-D, is empty, or holds NaN or inf.
    """
    arrays.array_kind(w)
    if not arrays.is_float_dtype(w):
        raise TypeError(f"pack: w must be a float array, got dtype {arrays.dtype_name(w)}")
    if w.ndim != 2 or min(w.shape) < 1:
        raise ValueError(f"pack: w must be 2-D (N, K) with N, K >= 1, got shape {tuple(w.shape)}")
    n, k = (int(s) for s in w.shape)
    if arrays.is_torch(w):
        return PackedSigns(_pack_torch(w), (n, k))
    _check_finite_numpy(w)
    bits = np.zeros((n, row_bytes(k) * 8), dtype=bool)
    bits[:, :k] = w >= 0
    return PackedSigns(np.packbits(bits, axis=1, bitorder="little"), (n, k))


def _check_finite_numpy(w: np.ndarray) -> None:
    bad = ~np.isfinite(w)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"pack: w holds {int(bad.sum())} NaN/inf value(s), first at index {first}")


def _pack_torch(w: Any) -> Any:
    import torch

    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"pack: w holds {int(bad.sum())} NaN/inf value(s), first at index {first}")
    n, k = w.shape
    bits = torch.zeros((n, row_bytes(k) * 8), dtype=torch.uint8, device=w.device)
    bits[:, :k] = w >= 0
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=w.device)
    return (bits.view(n, -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack(packed: PackedSigns, dtype: Any = None) -> Any:
    """The dense sign matrix.

    Args:
        packed: signs of shape (N, K).
        dtype: output dtype of packed's library (default float32).

    Returns:
        (N, K) array of +1 / -1 on packed's library and device. For torch data the result is a view of an
        (N, 32 * ceil(K / 32)) array, built by one table lookup per byte through an int32 index of
        N * 4 * ceil(K / 32) elements.
    """
    n, k = packed.shape
    if arrays.is_torch(packed.data):
        import torch

        data = packed.data
        codes = torch.arange(256, device=data.device).unsqueeze(1)
        table = (((codes >> torch.arange(8, device=data.device)) & 1) * 2 - 1).to(
            torch.float32 if dtype is None else dtype)
        return table.index_select(0, data.flatten().int()).view(n, -1)[:, :k]
    bits = np.unpackbits(packed.data, axis=1, count=k, bitorder="little")
    return (bits.astype(np.float32 if dtype is None else dtype) * 2) - 1
