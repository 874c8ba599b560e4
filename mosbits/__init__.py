"""mosbits: packed 1-bit weights with token-adaptive Mixture-of-Scales (BinaryMoS).

``import mosbits`` imports NumPy and safetensors only; backends load their libraries when first used, and
``mosbits.export`` (ONNX) is imported on first use.
"""

import importlib
from typing import Any

from mosbits import backends, reference
from mosbits.api import matmul
from mosbits.dispatch import BackendUnavailableError
from mosbits.experts import Experts
from mosbits.format import FORMAT_VERSION, PackedSigns, pack, unpack
from mosbits.io import FormatError, MoSLinearWeights, load, save
from mosbits.prepared import PreparedLayer, prepare

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "BackendUnavailableError",
    "Experts",
    "FormatError",
    "MoSLinearWeights",
    "PackedSigns",
    "PreparedLayer",
    "__version__",
    "backends",
    "export",
    "load",
    "matmul",
    "pack",
    "prepare",
    "reference",
    "save",
    "unpack",
]


def __getattr__(name: str) -> Any:
    """``mosbits.export`` on first use, so that ``import mosbits`` does not import the exporters."""
    if name == "export":
        return importlib.import_module("mosbits.export")
    raise AttributeError(f"module 'mosbits' has no attribute {name!r}")
