"""Packed models of any shape, built from a transformers config without ever holding a dense or latent weight.

`random_packed` is what benchmarks and runtime authors need: a LLaMA-7B-width model whose decoder linears are
`PackedMoSLinear` layers with random signs and scales of a trained layer's magnitude, at the memory of its packed
bytes (a 7B model's packed decoder is about 0.9 GB; its fp32 latents would be 27 GB).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from mosbits.format import padding_mask, row_bytes
from mosbits.hf.config import MoSConfig
from mosbits.hf.fusion import plan
from mosbits.hf.layers import PackedMoSLinear, check_num_experts
from mosbits.hf.remote import mark
from mosbits.hf.surgery import linear_shape, replace_module, select_linears

SCALE_SPREAD = 0.1
"""Relative spread (log-normal sigma) of the random scales around their mean."""


def random_packed(config: PretrainedConfig, num_experts: int = 4, dtype: torch.dtype = torch.bfloat16,
                  seed: int = 0, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """A transformers causal LM on the CPU whose decoder linears are packed, with random weights.

    The model is built on the meta device; each linear inside the decoder blocks (as `mosbits.hf.binarize`
    chooses them) becomes a `PackedMoSLinear` with random signs (padding bits 0), scales whose product has the
    mean |w| of a N(0, initializer_range^2) weight (so activations keep a trained model's magnitude), a random
    router and zero bias; every other tensor (embeddings, norms, lm_head, rotary tables) is then allocated and
    initialised by the model's own ``_init_weights``. No dense or latent weight of a packed layer ever exists.

    Args:
        config: a transformers config of a causal LM (``AutoModelForCausalLM.from_config`` must know it).
        num_experts: E >= 1.
        dtype: the dtype of the scales, routers and every dense tensor (bfloat16 by default, as a model would be
            served; the lm_head stays dense in it, as the paper keeps it 16-bit).
        seed: seeds every random tensor (the global RNG is left as it was).
        skip: linear layers inside the blocks that stay dense (matched as in `binarize`).

    Returns:
        The model in eval mode, with ``config.quantization_config`` recording its packed layers, so that
        ``save_pretrained`` writes a mosbits folder.
    """
    check_num_experts(num_experts)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    std = getattr(config, "initializer_range", 0.02) or 0.02
    names = select_linears(model, None, tuple(skip))
    for name in names:
        module = model.get_submodule(name)
        n, k = linear_shape(module)
        layer = PackedMoSLinear(k, n, num_experts, bias=getattr(module, "bias", None) is not None, dtype=dtype)
        fill_random(layer, std, generator)
        replace_module(model, name, layer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        materialize(model)
    model.config.quantization_config = MoSConfig(num_experts=num_experts, modules=names)
    plan(model)
    mark(model)
    return model.eval()


def fill_random(layer: PackedMoSLinear, std: float, generator: torch.Generator) -> None:
    """Random signs and router, scales around sqrt(std * sqrt(2 / pi)) each, zero bias, in place."""
    n, k = layer.out_features, layer.in_features
    e = layer.num_experts
    with torch.no_grad():
        signs = torch.randint(0, 256, (n, row_bytes(k)), dtype=torch.uint8, generator=generator)
        layer.signs.copy_(signs & torch.from_numpy(~padding_mask(k)))
        mean = math.sqrt(std * math.sqrt(2 / math.pi))
        for scale in (layer.s_in, layer.s_out):
            noise = torch.randn(scale.shape, generator=generator) * SCALE_SPREAD
            scale.copy_(mean * torch.exp(noise - SCALE_SPREAD**2 / 2))
        if layer.router is not None:
            bound = 1 / math.sqrt(k)
            layer.router.copy_((torch.rand(e, k, generator=generator) * 2 - 1) * bound)
        if layer.bias is not None:
            layer.bias.zero_()


def materialize(model: nn.Module) -> None:
    """Allocate every tensor still on the meta device on the CPU and initialise it with the model's
    ``_init_weights`` (tied tensors stay tied)."""
    done: dict[int, torch.Tensor] = {}
    touched = []
    for module in model.modules():
        moved = False
        for kind in ("_parameters", "_buffers"):
            for key, tensor in getattr(module, kind).items():
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in done:
                    empty = torch.empty_like(tensor, device="cpu")
                    done[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) \
                        if kind == "_parameters" else empty
                getattr(module, kind)[key] = done[id(tensor)]
                moved = True
        if moved:
            touched.append(module)
    with torch.no_grad():
        for module in touched:
            model._init_weights(module)
    model.tie_weights()
