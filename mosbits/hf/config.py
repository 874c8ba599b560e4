"""``quantization_config`` of a packed model: what config.json says about its mosbits layers.

Kept apart from the quantizer so that `mosbits.hf.surgery` (which writes it) and `mosbits.hf.quantizer` (which
reads it) both import it without importing each other.
"""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from mosbits.format import FORMAT_VERSION
from mosbits.hf.layers import check_num_experts

QUANT_METHOD = "mosbits"


class MoSConfig(QuantizationConfigMixin):
    """``quantization_config`` of a packed model (serialised in config.json).

    Attributes:
        quant_method: ``"mosbits"``.
        format_version: the packed format version of the signs (docs/FORMAT.md).
        num_experts: E of every mosbits layer.
        modules: full names of the mosbits layers (in the checkpoint and after loading).
        packed: True for `PackedMoSLinear` layers (signs as bits, inference); False for a student in training,
            whose `MoSLinear` layers hold float latent weights (`mosbits.hf.binarize` writes it; `pack` sets it
            True). Configs written before the field existed are packed.
    """

    def __init__(self, num_experts: int = 4, modules: list[str] | None = None, format_version: str = FORMAT_VERSION,
                 packed: bool = True, **kwargs: Any) -> None:
        check_num_experts(num_experts)
        if not isinstance(packed, bool):
            raise TypeError(f"packed must be a bool, got {packed!r}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.num_experts = num_experts
        self.modules = list(modules or [])
        self.packed = packed
