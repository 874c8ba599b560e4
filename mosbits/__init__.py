"""mosbits: packed 1-bit weights with token-adaptive Mixture-of-Scales (BinaryMoS).

``import mosbits`` imports NumPy and safetensors only; backends load their libraries when first used.
"""

from mosbits import backends, export, reference
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
