"""transformers integration: the ``"mosbits"`` quantization config and HfQuantizer, and a checked loader.

Importing this module registers both under ``quant_method = "mosbits"`` (transformers 5.x public registry, no
patching). ``from_pretrained`` of a packed checkpoint then rebuilds its `PackedMoSLinear` layers before the
weights load, and the loader fills their buffers from the safetensors file as they were saved (uint8 signs stay
uint8). Without the import, transformers only warns about an unknown quantization method and loads a dense model
with random linear weights: `check_packed` and `load` catch that.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from mosbits.format import FORMAT_VERSION
from mosbits.hf.config import QUANT_METHOD, MoSConfig
from mosbits.hf.layers import PackedMoSLinear
from mosbits.hf.surgery import linear_shape, replace_module


class MoSHfQuantizer(HfQuantizer):
    """Loads packed mosbits checkpoints; it cannot quantize a dense checkpoint (that needs distillation: use
    `mosbits.hf.binarize`, `distill`, `pack`)."""

    requires_calibration = True

    def __init__(self, quantization_config: MoSConfig, **kwargs: Any) -> None:
        if not kwargs.get("pre_quantized", True):
            raise ValueError("mosbits cannot quantize a dense checkpoint while loading it (BinaryMoS needs "
                             "distillation): binarize, distil and pack it with mosbits.hf (or `mosbits binarize`), "
                             "save_pretrained, then load that folder")
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.quantization_config.format_version != FORMAT_VERSION:
            raise ValueError(f"mosbits checkpoint has packed format {self.quantization_config.format_version!r}; this "
                             f"mosbits reads {FORMAT_VERSION!r}: upgrade mosbits")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """Swap each module named in the config for an empty `PackedMoSLinear` on the same device and dtype.

        The parents of the packed layers that hold no tensor of their own are marked as initialised
        (``_is_hf_initialized``, the flag transformers sets on loaded modules): every tensor below them comes from
        the checkpoint, and some models' ``_init_weights`` (GPT-2's on its attention and MLP blocks) would
        otherwise reach for a ``weight`` that a packed layer does not have.
        """
        num_experts = self.quantization_config.num_experts
        for name in self.quantization_config.modules:
            module = model.get_submodule(name)
            n, k = linear_shape(module)
            has_bias = getattr(module, "bias", None) is not None
            replace_module(model, name, PackedMoSLinear(k, n, num_experts, bias=has_bias,
                                                        device=module.weight.device, dtype=module.weight.dtype))
            parent = model.get_submodule(name.rpartition(".")[0])
            own_tensors = [*parent.parameters(recurse=False), *parent.buffers(recurse=False)]
            if not own_tensors:
                parent._is_hf_initialized = True
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register `MoSConfig` and `MoSHfQuantizer` with transformers under "mosbits" (once per process)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoSConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoSHfQuantizer)


def check_packed(model: nn.Module) -> nn.Module:
    """Check that a model loaded from a mosbits checkpoint holds its packed layers; return it.

    Raises:
        ValueError: the model's config has no mosbits ``quantization_config``.
        RuntimeError: a module the config names is not a `PackedMoSLinear` (the checkpoint was loaded before
            ``import mosbits.hf``, so transformers skipped the quantizer and left random weights), or a buffer
            was not loaded.
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict):
        config = MoSConfig.from_dict(config) if config.get("quant_method") == QUANT_METHOD else None
    if not isinstance(config, MoSConfig):
        raise ValueError(f"{type(model).__name__} has no mosbits quantization_config: not a packed mosbits model")
    wrong = [name for name in config.modules if not isinstance(model.get_submodule(name), PackedMoSLinear)]
    if wrong:
        raise RuntimeError(
            f"{len(wrong)} of {len(config.modules)} mosbits layers were loaded as "
            f"{type(model.get_submodule(wrong[0])).__name__} (first: {wrong[0]!r}) with random weights: "
            "`import mosbits.hf` must run before from_pretrained (transformers only warns about an unknown "
            "quantization method), or load with mosbits.hf.load(path)")
    unloaded = [name for name, b in model.named_buffers() if b.is_meta]
    if unloaded:
        raise RuntimeError(f"buffer {unloaded[0]!r} was not loaded from the checkpoint (still on the meta device)")
    return model


def load(path: str | os.PathLike, model_class: Any = AutoModelForCausalLM, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(path, **kwargs)`` with the mosbits quantizer registered, then `check_packed`.

    Args:
        path: a directory written by ``save_pretrained`` after `mosbits.hf.pack`.
        model_class: a transformers auto class or model class.
        kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    register()
    return check_packed(model_class.from_pretrained(path, **kwargs))
