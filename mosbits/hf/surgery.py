"""Swap the linear layers of a model instance: `binarize` (dense -> `MoSLinear`) and `pack` (-> `PackedMoSLinear`).

Modules are replaced on the instance with ``setattr`` on their parent; no transformers class is patched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from mosbits.hf.config import MoSConfig
from mosbits.hf.fusion import plan
from mosbits.hf.layers import MoSLinear, PackedMoSLinear, check_num_experts
from mosbits.hf.remote import mark

LINEAR_TYPES = (nn.Linear, Conv1D)


def binarize(model: nn.Module, num_experts: int = 4, targets: Iterable[str] | None = None,
             skip: Iterable[str] = ("lm_head",), seed: int | None = None) -> nn.Module:
    """Replace linear layers by `MoSLinear`, in place, and freeze everything else.

    Args:
        model: a (transformers) model instance.
        num_experts: E >= 1 scaling experts per layer; 1 gives the OneBit-style layer without a router.
        targets: which modules to convert, as names matched against each module's full name or its trailing
            components (``"q_proj"`` matches every ``...self_attn.q_proj``; ``"model.layers.0.mlp.up_proj"``
            one module). Default: every ``nn.Linear`` (and GPT-2's ``Conv1D``, transposed) inside the decoder
            blocks (`decoder_blocks`).
        skip: names, matched the same way, never converted.
        seed: seeds the routers' init (one generator for the whole model); None uses torch's global RNG.

    Returns:
        model, whose only trainable parameters are now the latent weights, scales and routers of its MoSLinear
        layers (as the paper trains). Its config records the layers (``MoSConfig(packed=False)``), so a student
        saved with ``save_pretrained`` reloads as a student (`mosbits.hf.load`), never as a dense model.

    Raises:
        ValueError: bad num_experts, the model already holds mosbits layers, or nothing to convert.
        TypeError: a module named by ``targets`` is not a linear layer.
    """
    check_num_experts(num_experts)
    if any(isinstance(m, MoSLinear | PackedMoSLinear) for m in model.modules()):
        raise ValueError("model already holds MoSLinear / PackedMoSLinear layers; binarize a dense model")
    names = select_linears(model, targets, tuple(skip))
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight.T if _is_conv1d(module) else module.weight
        replace_module(model, name, MoSLinear.from_weight(weight.detach(), _bias(module), num_experts, generator))
    freeze_all_but_mos(model)
    _record(model, MoSConfig(num_experts=num_experts, modules=names, packed=False))
    return model


def freeze_all_but_mos(model: nn.Module) -> None:
    """Leave trainable only the latent weights, scales and routers of ``model``'s `MoSLinear` layers."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, MoSLinear):
            for name, parameter in module.named_parameters():
                parameter.requires_grad_(name != "bias")


def _record(model: nn.Module, config: MoSConfig) -> None:
    """Write ``config`` as the model's ``quantization_config`` and make its ``save_pretrained`` write a mosbits
    folder (`mosbits.hf.remote`), when the model has a transformers config."""
    if isinstance(getattr(model, "config", None), PretrainedConfig):
        model.config.quantization_config = config
        mark(model)


def select_linears(model: nn.Module, targets: Iterable[str] | None, skip: tuple[str, ...]) -> list[str]:
    """Full names of the modules `binarize` converts, in ``named_modules`` order."""
    if targets is None:
        prefixes = tuple(f"{block}." for block in decoder_blocks(model))
        names = [name for name, m in model.named_modules() if name.startswith(prefixes) and isinstance(m, LINEAR_TYPES)]
        if not names:
            raise ValueError(f"no nn.Linear inside the decoder blocks of {type(model).__name__}: pass targets=")
    else:
        targets = tuple(targets)
        names = [name for name, _ in model.named_modules() if name and matches(name, targets)]
        if not names:
            raise ValueError(f"targets {targets} match no module of {type(model).__name__}")
        wrong = [n for n in names if not isinstance(model.get_submodule(n), LINEAR_TYPES)]
        if wrong:
            raise TypeError(f"targets name {wrong[0]!r}, a {type(model.get_submodule(wrong[0])).__name__}; "
                            "only nn.Linear and transformers' Conv1D can be binarized")
    names = [n for n in names if not matches(n, skip)]
    if not names:
        raise ValueError(f"every candidate module is skipped by skip={skip}")
    return names


def decoder_blocks(model: nn.Module) -> list[str]:
    """Full names of the decoder blocks: modules of the classes in ``model._no_split_modules`` (transformers'
    list of repeated blocks, e.g. ``LlamaDecoderLayer``), else the children of the longest ``nn.ModuleList``.

    Raises:
        ValueError: the model has neither.
    """
    classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [name for name, m in model.named_modules() if type(m).__name__ in classes]
    if blocks:
        return blocks
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no decoder blocks (no _no_split_modules, no nn.ModuleList): "
                         "pass targets=")
    name, longest = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{i}" if name else str(i) for i in range(len(longest))]


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """True when ``name`` is one of ``patterns`` or ends with ``"." + pattern``."""
    return any(name == p or name.endswith(f".{p}") for p in patterns)


def pack(model: nn.Module) -> nn.Module:
    """Replace every `MoSLinear` by `PackedMoSLinear`, in place, and record the conversion in the model's config;
    layers that read one input are linked to share their calls (`mosbits.hf.fusion`).

    Sets ``model.config.quantization_config`` to a `mosbits.hf.MoSConfig` (when the model has a transformers
    config), so that ``save_pretrained`` writes a folder that loads back packed, with `mosbits.hf.load` or
    ``from_pretrained(folder, trust_remote_code=True)``, and never as a dense model (`mosbits.hf.remote`).

    Raises:
        ValueError: the model holds no MoSLinear.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, MoSLinear)]
    if not names:
        raise ValueError(f"{type(model).__name__} holds no MoSLinear to pack: call mosbits.hf.binarize first")
    experts = {model.get_submodule(name).num_experts for name in names}
    if len(experts) > 1:
        raise ValueError(f"MoSLinear layers disagree on num_experts ({sorted(experts)}); one value per model")
    for name in names:
        replace_module(model, name, PackedMoSLinear.from_mos(model.get_submodule(name)))
    _record(model, MoSConfig(num_experts=experts.pop(), modules=names))
    plan(model)
    return model


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule ``name`` (dotted) of ``model`` to ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(N, K) = (out_features, in_features) of an ``nn.Linear`` or a ``Conv1D`` (whose weight is (K, N))."""
    n, k = module.weight.shape
    return (k, n) if _is_conv1d(module) else (n, k)


def _is_conv1d(module: Any) -> bool:
    return isinstance(module, Conv1D)


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()
