"""mosbits: packed 1-bit weights with token-adaptive Mixture-of-Scales (BinaryMoS).

``import mosbits`` imports NumPy and safetensors only; backends load their libraries when first used.
"""

from mosbits import backends, export, reference
from mosbits.api import matmul
from mosbits.dispatch import BackendUnavailableError
from mosbits.experts import Experts
from mosbits.format import FORMAT_VERSION, PackedSigns, pack, unpack
from mosbits.io import FormatError, MoSLinearWeights, load, save

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "BackendUnavailableError",
    "Experts",
    "FormatError",
    "MoSLinearWeights",
    "PackedSigns",
    "__version__",
    "backends",
    "export",
    "load",
    "matmul",
    "pack",
    "reference",
    "save",
    "unpack",
]
