"""transformers integration: the ``"mosbits"`` quantization config and HfQuantizer, and a checked loader.

Importing this module registers both under ``quant_method = "mosbits"`` (transformers 5.x public registry, no
patching). ``from_pretrained`` of a mosbits folder then rebuilds its `PackedMoSLinear` layers (or, for a saved
student, its `MoSLinear` layers) before the weights load, and the loader fills them from the safetensors file as
they were saved (uint8 signs stay uint8). Folders saved by mosbits cannot load without mosbits
(`mosbits.hf.remote`); `check_packed` still checks what a model holds after loading.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from mosbits.format import FORMAT_VERSION
from mosbits.hf.config import QUANT_METHOD, MoSConfig
from mosbits.hf.fusion import plan
from mosbits.hf.layers import MoSLinear, PackedMoSLinear
from mosbits.hf.remote import base_config, mark
from mosbits.hf.surgery import freeze_all_but_mos, linear_shape, replace_module


class MoSHfQuantizer(HfQuantizer):
    """Loads mosbits checkpoints (packed models, and students saved in training); it cannot quantize a dense
    checkpoint (that needs distillation: use `mosbits.hf.binarize`, `distill`, `pack`)."""

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
        """Swap each module named in the config for an empty `PackedMoSLinear` (a `MoSLinear` for a student)
        on the same device and dtype.

        The parents of the packed layers that hold no tensor of their own are marked as initialised
        (``_is_hf_initialized``, the flag transformers sets on loaded modules): every tensor below them comes from
        the checkpoint, and some models' ``_init_weights`` (GPT-2's on its attention and MLP blocks) would
        otherwise reach for a ``weight`` that a packed layer does not have. Packed layers that read one input are
        linked to share their calls (`mosbits.hf.fusion`).
        """
        num_experts = self.quantization_config.num_experts
        layer_class = PackedMoSLinear if self.quantization_config.packed else MoSLinear
        for name in self.quantization_config.modules:
            module = model.get_submodule(name)
            n, k = linear_shape(module)
            has_bias = getattr(module, "bias", None) is not None
            replace_module(model, name, layer_class(k, n, num_experts, bias=has_bias,
                                                    device=module.weight.device, dtype=module.weight.dtype))
            parent = model.get_submodule(name.rpartition(".")[0])
            own_tensors = [*parent.parameters(recurse=False), *parent.buffers(recurse=False)]
            if not own_tensors:
                parent._is_hf_initialized = True
        if self.quantization_config.packed:
            plan(model)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """A student trains as `mosbits.hf.binarize` left it: only its MoSLinear parameters (bias excepted)."""
        if not self.quantization_config.packed:
            freeze_all_but_mos(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """A student trains its MoSLinear layers; a packed model its scales and routers, once
        `mosbits.hf.trainable_scales` made them parameters (the signs stay frozen bits)."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Trainer may train the model itself, with no adapters attached (see `is_trainable`)."""
        return True


def register() -> None:
    """Register `MoSConfig` and `MoSHfQuantizer` with transformers under "mosbits" (once per process)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoSConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoSHfQuantizer)


def check_packed(model: nn.Module) -> nn.Module:
    """Check that a model loaded from a mosbits checkpoint holds its mosbits layers; return it.

    Raises:
        ValueError: the model's config has no mosbits ``quantization_config``.
        RuntimeError: a module the config names is not a `PackedMoSLinear` (a `MoSLinear` for a student): the
            checkpoint was loaded without the mosbits quantizer, so its layers hold random weights; or a buffer
            was not loaded.
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict):
        config = MoSConfig.from_dict(config) if config.get("quant_method") == QUANT_METHOD else None
    if not isinstance(config, MoSConfig):
        raise ValueError(f"{type(model).__name__} has no mosbits quantization_config: not a packed mosbits model")
    layer_class = PackedMoSLinear if config.packed else MoSLinear
    wrong = [name for name in config.modules if not isinstance(model.get_submodule(name), layer_class)]
    if wrong:
        raise RuntimeError(
            f"{len(wrong)} of {len(config.modules)} mosbits layers were loaded as "
            f"{type(model.get_submodule(wrong[0])).__name__} (first: {wrong[0]!r}) with random weights: "
            "load the folder with mosbits.hf.load(path), or from_pretrained(path, trust_remote_code=True); "
            "a folder saved by an older mosbits needs `import mosbits.hf` before from_pretrained")
    unloaded = [name for name, b in model.named_buffers() if b.is_meta]
    if unloaded:
        raise RuntimeError(f"buffer {unloaded[0]!r} was not loaded from the checkpoint (still on the meta device)")
    return model


def load(path: str | os.PathLike, model_class: Any = AutoModelForCausalLM, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(path, **kwargs)`` with the mosbits quantizer registered, then `check_packed`.

    Args:
        path: a directory written by ``save_pretrained`` of a model holding mosbits layers (after
            `mosbits.hf.pack`, or a student after `mosbits.hf.binarize`), or by ``mosbits convert-binarymos``.
        model_class: a transformers auto class or model class.
        kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...); a ``config`` given here is used
            without its ``auto_map``, else the folder's config.json is read (`mosbits.hf.remote.base_config`).

    Returns:
        The model, whose ``save_pretrained`` writes a mosbits folder again.
    """
    register()
    config = kwargs.pop("config", None)
    if config is None:
        config = base_config(path)
    elif hasattr(config, "auto_map"):
        config = copy.deepcopy(config)
        del config.auto_map
    return mark(check_packed(model_class.from_pretrained(path, config=config, **kwargs)))
