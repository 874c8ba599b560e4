"""List and validate the layers of a mosbits file.

Prints each layer's shape N x K, experts E, float dtype, bias, bytes and bits per weight, then the file's size
against the same weights dense in fp16. Every layer is validated as ``mosbits.load`` does (format version,
tensor names, shapes, dtypes, padding bits: docs/FORMAT.md, section 6), and its float tensors must be finite.

Exit status: 0 when the file is valid; 1 when it is not (the message names the layer and the problem); 2 on a
usage error, a missing path, or a bfloat16 file without torch installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

from mosbits import arrays
from mosbits.format import FORMAT_VERSION
from mosbits.io import FormatError, MoSLinearWeights, check_header, load
from mosbits.perf.tables import format_table

SUMMARY = "list and validate the layers of a mosbits file"


class CannotInspect(Exception):
    """The path cannot be inspected here (missing, a folder, or bfloat16 without torch): not a format problem."""


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One valid layer: signs (N, K), E experts, float parameters in ``dtype``, ``nbytes`` of tensor data."""

    name: str
    n: int
    k: int
    experts: int
    dtype: str
    bias: bool
    nbytes: int

    @property
    def weights(self) -> int:
        return self.n * self.k

    @property
    def fp16_bytes(self) -> int:
        """Bytes of the same layer as a dense fp16 nn.Linear: weight (N, K) and bias (N,)."""
        return 2 * (self.weights + (self.n if self.bias else 0))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.weights


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """A valid file: its size on disk, its safetensors header size and its layers, in file order of names."""

    path: str
    file_bytes: int
    header_bytes: int
    layers: list[LayerInfo]

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def fp16_bytes(self) -> int:
        return sum(layer.fp16_bytes for layer in self.layers)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields, the totals, and per layer its fields and bits per weight."""
        layers = [{**dataclasses.asdict(layer), "bits_per_weight": layer.bits_per_weight,
                   "fp16_bytes": layer.fp16_bytes} for layer in self.layers]
        return {"path": self.path, "valid": True, "format": FORMAT_VERSION, "file_bytes": self.file_bytes,
                "header_bytes": self.header_bytes, "weights": self.weights, "fp16_bytes": self.fp16_bytes,
                "bits_per_weight": 8 * self.file_bytes / self.weights, "layers": layers}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a mosbits .safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    """Inspect ``args.path``; 0 valid, 1 invalid, 2 not inspectable here."""
    try:
        info = describe(args.path)
    except CannotInspect as err:
        print(f"mosbits inspect: {err}", file=sys.stderr)
        return 2
    except FormatError as err:
        if args.json:
            print(json.dumps({"path": str(args.path), "valid": False, "error": str(err)}))
        print(f"mosbits inspect: invalid file: {err}", file=sys.stderr)
        return 1
    print(json.dumps(info.as_dict(), indent=1) if args.json else report(info))
    return 0


def describe(path: str | os.PathLike) -> FileInfo:
    """Load and validate every layer of ``path`` and describe them.

    Raises:
        FormatError: the file is not a valid mosbits file (as `mosbits.load`, which also refuses a float
            tensor holding NaN or inf); the message names the layer and the tensor.
        CannotInspect: ``path`` is missing or a folder, or holds bfloat16 tensors and torch is not installed.
    """
    p = Path(path)
    if not p.exists():
        raise CannotInspect(f"{path}: no such file")
    if not p.is_file():
        raise CannotInspect(f"{path}: not a file")
    framework = "numpy"
    if _declares_bfloat16(p):
        if importlib.util.find_spec("torch") is None:
            raise CannotInspect(f"{path}: holds bfloat16 tensors, which need torch: pip install 'mosbits[torch]'")
        framework = "torch"
    layers = load(p, framework=framework)
    with open(p, "rb") as f:
        (header_bytes,) = struct.unpack("<Q", f.read(8))
    infos = [_layer_info(name, layer) for name, layer in layers.items()]
    return FileInfo(str(path), p.stat().st_size, header_bytes, infos)


def _declares_bfloat16(path: Path) -> bool:
    """Whether the header declares a BF16 tensor; False when it cannot be read (`load` then says why)."""
    try:
        header = check_header(path)
    except (FormatError, OSError):
        return False
    return any(entry["dtype"] == "BF16" for key, entry in header.items() if key != "__metadata__")


def _layer_info(name: str, layer: MoSLinearWeights) -> LayerInfo:
    n, k = layer.packed.shape
    return LayerInfo(name, n, k, layer.experts.num_experts, arrays.dtype_name(layer.router), layer.bias is not None,
                     layer.nbytes)


def report(info: FileInfo) -> str:
    """The table of layers and the file's totals, as text."""
    rows = [[layer.name, f"{layer.n} x {layer.k}", str(layer.experts), layer.dtype, "yes" if layer.bias else "no",
             f"{layer.nbytes:,}", f"{layer.bits_per_weight:.3f}", f"{layer.fp16_bytes / layer.nbytes:.2f}x"]
            for layer in info.layers]
    table = format_table(["layer", "N x K", "E", "dtype", "bias", "bytes", "bits/weight", "vs fp16"], rows,
                         "lrrllrrr")
    return (f"{info.path}: mosbits format {FORMAT_VERSION}, {len(info.layers)} layer(s), all valid\n\n{table}\n\n"
            f"file: {info.file_bytes:,} bytes (header {info.header_bytes:,}) for {info.weights:,} weights = "
            f"{8 * info.file_bytes / info.weights:.3f} bits/weight; dense fp16: {info.fp16_bytes:,} bytes "
            f"({info.fp16_bytes / info.file_bytes:.2f}x the file)")
