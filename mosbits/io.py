"""Packed layers on disk: safetensors files with the format-v1 metadata (docs/FORMAT.md).

A file holds any number of named layers. Layer ``<name>`` is the tensors ``<name>.signs`` (uint8, (N, 4 *
ceil(K / 32))), ``<name>.s_in`` (E, K), ``<name>.s_out`` (E, N), ``<name>.router`` (E, K) and optionally
``<name>.bias`` (N,), with metadata ``mosbits.format = "1"`` and ``<name>.shape = "N,K"``.

`load` is strict where a lenient JSON reader would quietly pick one meaning (FORMAT.md section 6): a key that
appears twice in the header or in ``__metadata__``, a tensor entry with fields other than ``dtype``, ``shape`` and
``data_offsets``, a JSON number that is NaN or infinite, an empty layer name, and a float tensor holding NaN or
inf are all refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mosbits import arrays
from mosbits.api import check_layer, matmul
from mosbits.experts import Experts
from mosbits.format import FORMAT_VERSION, PackedSigns

FORMAT_KEY = "mosbits.format"
TENSOR_SUFFIXES = ("signs", "s_in", "s_out", "router", "bias")
_REQUIRED = ("signs", "s_in", "s_out", "router")
_SHAPE = re.compile(r"([1-9][0-9]{0,17}),([1-9][0-9]{0,17})")
ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on the header's length."""


class FormatError(ValueError):
    """A file is not a valid mosbits file; the message names the layer and the problem."""


@dataclasses.dataclass(frozen=True)
class MoSLinearWeights:
    """Everything one BinaryMoS linear layer needs at inference.

    Attributes:
        packed: signs (N, K).
        experts: s_in (E, K), s_out (E, N).
        router: (E, K).
        bias: (N,) or None.
    """

    packed: PackedSigns
    experts: Experts
    router: Any
    bias: Any = None

    def __post_init__(self) -> None:
        check_layer(self.packed, self.experts, self.router, self.bias)

    def __call__(self, x: Any, backend: str = "auto", precision: str = "exact") -> Any:
        """``mosbits.matmul`` with this layer's weights: x (..., K) -> (..., N)."""
        return matmul(x, self.packed, self.experts, self.router, bias=self.bias, backend=backend,
                      precision=precision)

    def prepare(self, backend: str = "auto", precision: str = "exact") -> Any:
        """This layer validated once and bound to a backend and precision (`mosbits.prepare`)."""
        from mosbits.prepared import prepare

        return prepare(self.packed, self.experts, self.router, self.bias, backend=backend, precision=precision)

    @property
    def nbytes(self) -> int:
        """Bytes of signs, experts, router and bias together."""
        return (self.packed.nbytes + self.experts.nbytes + arrays.nbytes(self.router)
                + (0 if self.bias is None else arrays.nbytes(self.bias)))


def save(path: str | os.PathLike, layers: Mapping[str, MoSLinearWeights]) -> None:
    """Write named layers to a safetensors file, atomically.

    The bytes go to a temporary file in the target's folder, which is flushed, fsynced and renamed over
    ``path``: an interrupted save never leaves a truncated file under that name.

    Args:
        path: target file.
        layers: name -> layer. All arrays must be NumPy, or all torch (any device; bfloat16 needs torch).
    """
    if not layers:
        raise ValueError("save: layers is empty; nothing to write")
    tensors: dict[str, Any] = {}
    metadata = {FORMAT_KEY: FORMAT_VERSION}
    for name, layer in layers.items():
        if not isinstance(layer, MoSLinearWeights):
            raise TypeError(f"save: layers[{name!r}] must be MoSLinearWeights, got {type(layer).__name__}")
        if not name or name.endswith(".") or name == FORMAT_KEY:
            raise ValueError(f"save: invalid layer name {name!r}")
        parts = {"signs": layer.packed.data, "s_in": layer.experts.s_in, "s_out": layer.experts.s_out,
                 "router": layer.router, "bias": layer.bias}
        tensors.update({f"{name}.{suffix}": a for suffix, a in parts.items() if a is not None})
        metadata[f"{name}.shape"] = "{},{}".format(*layer.packed.shape)
    libs = {arrays.library(a) for a in tensors.values()}
    if len(libs) > 1:
        raise TypeError("save: mix of numpy and torch arrays; convert all layers to one library")
    if libs == {"torch"}:
        from safetensors.torch import save as to_bytes

        tensors = {key: a.detach().contiguous().cpu() for key, a in tensors.items()}
    else:
        from safetensors.numpy import save as to_bytes
    write_atomically(Path(path), to_bytes(tensors, metadata=metadata))


def write_atomically(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a fresh temporary file beside ``path`` (mode 0o666 less the umask, as ``open`` would
    create it), fsync it, rename it over ``path`` and fsync the folder."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | os.PathLike, framework: str = "numpy", device: str = "cpu") -> dict[str, MoSLinearWeights]:
    """Read and validate every layer of a file written by `save`.

    Args:
        path: the file.
        framework: ``"numpy"`` or ``"torch"`` (needed for bfloat16 tensors).
        device: torch device for the tensors (framework="torch" only).

    Returns:
        name -> MoSLinearWeights, in file order of names. Either every layer loads and validates, or nothing is
        returned.

    Raises:
        FormatError: truncated or unreadable file, unknown format version, missing or unexpected tensors,
            inconsistent shapes, wrong dtypes, or set padding bits; the message names the layer.
    """
    if framework not in ("numpy", "torch"):
        raise ValueError(f"load: framework must be 'numpy' or 'torch', got {framework!r}")
    from safetensors import safe_open

    check_header(path)
    try:
        with safe_open(path, framework="numpy" if framework == "numpy" else "pt", device=device) as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            _check_version(path, metadata)
            groups = _group_keys(path, keys, metadata)
            if framework == "numpy":
                _check_numpy_dtypes(path, f, keys)
            tensors = {key: f.get_tensor(key) for key in keys}
    except (FormatError, FileNotFoundError):
        raise
    except Exception as err:
        raise FormatError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    return {name: _build_layer(path, name, suffixes, tensors, metadata) for name, suffixes in groups.items()}


def check_header(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file, checked for what safetensors' own parser lets through.

    Raises:
        FormatError: the length prefix or the JSON is unreadable; a key appears twice (in the header or in
            ``__metadata__``); a number is NaN or infinite; ``__metadata__`` is not an object of strings; a tensor
            entry is not an object of exactly ``dtype``, ``shape`` and ``data_offsets``.
        FileNotFoundError: no such file.
    """
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise FormatError(f"{path}: not a readable safetensors file ({len(prefix)} bytes, shorter than the "
                              "8-byte header length)")
        (size,) = struct.unpack("<Q", prefix)
        if size > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: not a readable safetensors file (header length {size} exceeds "
                              f"{MAX_HEADER_BYTES} bytes)")
        text = f.read(size)
    if len(text) < size:
        raise FormatError(f"{path}: not a readable safetensors file (truncated header: {len(text)} of {size} "
                          "bytes)")
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise FormatError(f"{path}: header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: __metadata__ must be an object of strings")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != ENTRY_FIELDS:
            fields = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise FormatError(f"{path}: tensor entry {key!r} must have exactly the fields "
                              f"{sorted(ENTRY_FIELDS)}, got {fields}")
    return header


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_version(path: Any, metadata: Mapping[str, str]) -> None:
    version = metadata.get(FORMAT_KEY)
    if version is None:
        raise FormatError(f"{path}: no '{FORMAT_KEY}' metadata; not a mosbits file")
    if version != FORMAT_VERSION:
        raise FormatError(f"{path}: format version {version!r} is not supported (this mosbits reads "
                          f"{FORMAT_VERSION!r}); upgrade mosbits")


def _group_keys(path: Any, keys: list[str], metadata: Mapping[str, str]) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    for key in keys:
        name, _, suffix = key.rpartition(".")
        if not name and suffix in TENSOR_SUFFIXES:
            raise FormatError(f"{path}: tensor {key!r} has an empty layer name (layer names are non-empty)")
        if not name or suffix not in TENSOR_SUFFIXES:
            raise FormatError(f"{path}: unexpected tensor {key!r} (layer tensors end in {TENSOR_SUFFIXES})")
        groups.setdefault(name, set()).add(suffix)
    if not groups:
        raise FormatError(f"{path}: holds no layers")
    orphans = [key for key in metadata if key.endswith(".shape") and key.removesuffix(".shape") not in groups]
    if orphans:
        raise FormatError(f"{path}: metadata {orphans[0]!r} describes a layer that has no tensors")
    return groups


def _check_numpy_dtypes(path: Any, f: Any, keys: list[str]) -> None:
    for key in keys:
        if f.get_slice(key).get_dtype() == "BF16":
            raise FormatError(f"{path}: tensor {key!r} is bfloat16, which NumPy cannot hold: "
                              "load with framework='torch'")


def _build_layer(path: Any, name: str, suffixes: set[str], tensors: Mapping[str, Any],
                 metadata: Mapping[str, str]) -> MoSLinearWeights:
    where = f"{path}: layer {name!r}"
    missing = [s for s in _REQUIRED if s not in suffixes]
    if missing:
        raise FormatError(f"{where}: missing tensor(s) {', '.join(f'{name}.{s}' for s in missing)}")
    shape_text = metadata.get(f"{name}.shape")
    match = _SHAPE.fullmatch(shape_text or "")
    if match is None:
        raise FormatError(f"{where}: metadata '{name}.shape' must be 'N,K' (positive decimals), "
                          f"got {shape_text!r}")
    n, k = int(match[1]), int(match[2])
    get = {s: tensors.get(f"{name}.{s}") for s in TENSOR_SUFFIXES}
    try:
        packed = PackedSigns(get["signs"], (n, k)).validate()
        layer = MoSLinearWeights(packed, Experts(get["s_in"], get["s_out"]), get["router"], get["bias"])
    except (TypeError, ValueError) as err:
        raise FormatError(f"{where}: {err}") from err
    for suffix in ("s_in", "s_out", "router", "bias"):
        a = get[suffix]
        bad = 0 if a is None else int((~a.isfinite()).sum()) if arrays.is_torch(a) else int((~np.isfinite(a)).sum())
        if bad:
            raise FormatError(f"{where}: tensor {name}.{suffix} holds {bad} non-finite value(s) (NaN or inf)")
    return layer
