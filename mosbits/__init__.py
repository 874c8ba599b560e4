"""mosbits: packed 1-bit weights with token-adaptive Mixture-of-Scales (BinaryMoS).

``import mosbits`` imports NumPy and safetensors only; backends load their libraries when first used, and
``mosbits.export`` (ONNX) is imported on first use.
"""

import importlib
from typing import Any

from mosbits import threads

threads.apply_defaults()  # before NumPy loads its BLAS: see mosbits/threads.py

from mosbits import backends, reference  # noqa: E402
from mosbits.api import matmul  # noqa: E402
from mosbits.dispatch import BackendUnavailableError  # noqa: E402
from mosbits.experts import Experts  # noqa: E402
from mosbits.format import FORMAT_VERSION, PackedSigns, pack, unpack  # noqa: E402
from mosbits.io import FormatError, MoSLinearWeights, load, save  # noqa: E402
from mosbits.prepared import PreparedGroup, PreparedLayer, prepare, prepare_group  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "BackendUnavailableError",
    "Experts",
    "FormatError",
    "MoSLinearWeights",
    "PackedSigns",
    "PreparedGroup",
    "PreparedLayer",
    "__version__",
    "backends",
    "export",
    "load",
    "matmul",
    "pack",
    "prepare",
    "prepare_group",
    "reference",
    "save",
    "unpack",
]


def __getattr__(name: str) -> Any:
    """``mosbits.export`` on first use, so that ``import mosbits`` does not import the exporters."""
    if name == "export":
        return importlib.import_module("mosbits.export")
    raise AttributeError(f"module 'mosbits' has no attribute {name!r}")
